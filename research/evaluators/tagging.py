"""Word tags from sub-token predictions: NER scored and written as CoNLL.

For splits of `research.tasks.token_classification`: each word's predicted
tag is its first sub-token's (`conll.word_predictions`; a word cut off by
`data.max_length` is "O"), scored against the words' gold tags at the
entity level as conlleval does (`research.metrics.ner`, seqeval):
`entity_f1`, `entity_precision`, `entity_recall`, and the word `accuracy`
(`metrics` option; empty: `config.metrics`). `write` puts the words with
their gold and predicted tags in a CoNLL file (`token gold predicted`).
"""

from __future__ import annotations

import os

import numpy as np

from research.data import conll
from research.metrics import ner
from research.evaluators import common
from research.evaluators import token

METRICS = ("entity_f1", "entity_precision", "entity_recall", "accuracy")


class Evaluator(token.Evaluator):
  """See the module docstring."""
  METRICS = METRICS

  def sentences(self):
    """Each example's words (and gold tags, or None), in split order."""
    ex = self.split.examples
    bounds = ex["word_offsets"]
    cut = lambda flat: [flat[a:b].tolist() for a, b in zip(bounds[:-1],  # pylint: disable=unnecessary-lambda-assignment
                                                           bounds[1:])]
    return cut(ex["words"]), (cut(ex["tags"]) if len(ex["tags"]) else None)

  def word_tags(self, token_predictions) -> list:
    """Per-example sub-token predictions (real tokens) -> word tags."""
    names = self.split.label_names
    word_ids = self.split.arrays["word_ids"]
    bounds = self.split.offsets
    num_words = np.diff(self.split.examples["word_offsets"])
    out = []
    for i, prediction in enumerate(token_predictions):
      ids = word_ids[bounds[i]:bounds[i + 1]]
      out.append([names[p] if p is not None else "O" for p in
                  conll.word_predictions(ids, prediction.tolist(),
                                         int(num_words[i]))])
    return out

  def run(self, params, frozen):
    if not self.split.has_labels:
      return {}
    preds, _, _, totals = self._collect(params, frozen, keep_all=True)
    _, gold = self.sentences()
    predicted = self.word_tags(preds)
    scores = ner.entity_scores(gold, predicted)
    results = {"loss": common.loss(totals)}
    for name in self.metric_names(self.config, self.options):
      results[name] = scores[name.removeprefix("entity_")]
    return results

  def predict(self, params, frozen) -> dict:
    """{"tags": each example's word tags, "words": its words} (+ logits)."""
    preds, _, logits, _ = self._collect(params, frozen, keep_all=True)
    words, _ = self.sentences()
    out = {"tags": self.word_tags(preds), "words": words}
    return {**out, **({"logits": logits} if logits else {})}

  def write(self, params, frozen, out_dir, *, summary=None) -> dict:
    """Writes <out_dir>/predictions.conll: `token gold predicted` lines
    (`token predicted` when the split is unlabeled), one word a line and a
    blank line after each sentence. (`summary`, the run's, is not needed.)

    Returns:
      {"predictions": the path, "sentences": their number, and the scores
      when the split is labeled}.
    """
    del summary
    preds, _, _, _ = self._collect(params, frozen, keep_all=True)
    words, gold = self.sentences()
    tags = self.word_tags(preds)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "predictions.conll")
    conll.write_conll(path, words, gold, tags)
    out = {"predictions": path, "sentences": len(tags)}
    if gold is not None:
      scores = ner.entity_scores(gold, tags)
      out.update({f"entity_{k}": scores[k] for k in ("f1", "precision",
                                                      "recall")})
    return out
