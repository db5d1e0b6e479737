"""Per-token predictions against per-token labels (NER, tagging).

Only the labelled tokens count (the task's per-token weights: a word's
first sub-token). Every batch is cut into per-example arrays before
anything is joined, so batches of different widths never meet in one
array. Metrics (`metrics` option; empty: `config.metrics`): `accuracy`
(over labelled tokens), `perplexity` (exp of the loss: masked LM), and the
entity-level `entity_f1`, `entity_precision`, `entity_recall` of the tags
named by the split's label names (`research.metrics.ner`: seqeval, CoNLL's
rules).
"""

from __future__ import annotations

import numpy as np

from research.metrics import common as metrics_lib
from research.metrics import ner
from research.evaluators import common

METRICS = ("accuracy", "entity_f1", "entity_precision", "entity_recall",
           "perplexity")


class Evaluator(common.Evaluator):
  """See the module docstring."""
  METRICS = METRICS

  def _collect(self, params, frozen, keep_all=False):
    """Ragged per-example outputs: labelled tokens (or all real ones)."""
    preds, labels, logits, totals = [], [], [], []
    for _, out in self.outputs(params, frozen):
      totals.append(out)
      for b in np.flatnonzero(out["batch_weights"] > 0):
        where = (np.arange(out["weights"].shape[1]) < out["lengths"][b]
                 if keep_all else out["weights"][b] > 0)
        preds.append(out["predictions"][b][where])
        if "labels" in out:
          labels.append(out["labels"][b][where])
        if "logits" in out:
          logits.append(out["logits"][b][where])
    return preds, labels, logits, totals

  def run(self, params, frozen):
    if not self.split.has_labels:
      return {}
    preds, labels, _, totals = self._collect(params, frozen)
    return self.scores(preds, labels, totals)

  def scores(self, preds, labels, totals) -> dict:
    """{metric: value} from `_collect`'s per-example arrays and totals."""
    results = {"loss": common.loss(totals)}
    names = self.metric_names(self.config, self.options)
    if "perplexity" in names:
      results["perplexity"] = float(np.exp(results["loss"]))
    if "accuracy" in names:
      results["accuracy"] = metrics_lib.accuracy(np.concatenate(preds),
                                                 np.concatenate(labels))
    if any(n.startswith("entity_") for n in names):
      tags = np.asarray(self.split.label_names, dtype=object)
      # seqeval with conlleval's rules (research.metrics.ner).
      scores = ner.entity_scores([list(tags[t]) for t in labels],
                                 [list(tags[p]) for p in preds])
      results.update({n: scores[n[len("entity_"):]] for n in names
                      if n.startswith("entity_") and n[len("entity_"):] in scores})
    return results

  def predict(self, params, frozen) -> dict:
    """{"predictions": [per-example arrays over its real tokens]} (+ logits)."""
    preds, _, logits, _ = self._collect(params, frozen, keep_all=True)
    return {"predictions": preds, **({"logits": logits} if logits else {})}
