"""Extractive QA: answer texts from start/end logits, scored as SQuAD.

Post-processing, as BERT's SQuAD code and Hugging Face's
`postprocess_qa_predictions`: for every example, over all its features
(windows), the `n_best` highest start and end logits give candidate spans;
a span counts if both ends are context tokens, it does not run backwards
and has at most `max_answer_length` tokens; the best by start + end logit
is the answer, the context's characters between the two tokens' offsets.
Features are kept per example, never joined across batch widths. Metrics
(`metrics` option; empty: `config.metrics`): `exact_match` and `f1`
(`research.evaluation.squad`), fractions in [0, 1].
"""

from __future__ import annotations

import collections
import json

import numpy as np

from research.evaluation import squad
from research.evaluators import common

METRICS = ("exact_match", "f1")


class Evaluator(common.Evaluator):
  """See the module docstring."""
  CONFIG = {**common.Evaluator.CONFIG, "n_best": 20, "max_answer_length": 30}
  METRICS = METRICS

  def _features(self, params, frozen):
    """{example index: [(start logits, end logits, offsets)]} and totals."""
    by_example, totals = collections.defaultdict(list), []
    for _, out in self.outputs(params, frozen):
      totals.append(out)
      p = out["predictions"]
      for b in np.flatnonzero(out["batch_weights"] > 0):
        by_example[int(p["example_index"][b])].append(
            (p["start_logits"][b], p["end_logits"][b], p["offset_start"][b],
             p["offset_end"][b]))
    return by_example, totals

  def answer(self, context, features) -> str:
    """The best span's text over an example's features ("" if none)."""
    n_best, longest = self.options["n_best"], self.options["max_answer_length"]
    best, text = -np.inf, ""
    for start_logits, end_logits, span_start, span_end in features:
      starts = np.argsort(start_logits)[::-1][:n_best]
      ends = np.argsort(end_logits)[::-1][:n_best]
      for s in starts:
        for e in ends:
          if span_start[s] < 0 or span_end[e] < 0 or e < s or \
              e - s + 1 > longest:
            continue
          score = start_logits[s] + end_logits[e]
          if score > best:
            best, text = score, context[span_start[s]:span_end[e]]
    return text

  def predict(self, params, frozen) -> dict:
    """{"answers": the predicted text of every example, in order}."""
    by_example, _ = self._features(params, frozen)
    contexts = self.split.examples["context"]
    return {"answers": [self.answer(str(contexts[i]), by_example.get(i, []))
                        for i in range(len(contexts))]}

  def run(self, params, frozen):
    if not self.split.has_labels:
      return {}
    by_example, totals = self._features(params, frozen)
    contexts, golds = self.split.examples["context"], self.split.examples["answers"]
    scores = collections.defaultdict(list)
    for i, (context, gold) in enumerate(zip(contexts, golds)):
      texts = json.loads(gold)["text"] or [""]  # unanswerable: ""
      prediction = self.answer(str(context), by_example.get(i, []))
      # The official script's scores (research.evaluation.squad): the best
      # over the gold answers; fractions here, percentages there.
      scores["exact_match"].append(max(squad.exact_match(prediction, t)
                                       for t in texts))
      scores["f1"].append(max(squad.f1(prediction, t) for t in texts))
    results = {"loss": common.loss(totals)}
    for name in self.metric_names(self.config, self.options):
      results[name] = float(np.mean(scores[name]))
    return results
