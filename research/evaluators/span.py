"""Extractive QA: answers from start/end logits, scored as the SQuAD scripts.

Post-processing is `research.metrics.squad_decoding.decode`, as BERT's
`run_squad.py`: for every question, over all its windows, the `n_best`
highest start and end logits among context tokens pair into spans of at most
`max_answer_length` tokens, ranked by start + end logit. With the task's
`version_2` the null score (the [CLS] logits) competes: a question is
answered "" when `null_odds = null score - best span score` exceeds the
threshold. Windows are kept per question, never joined across batch widths.

Metrics (`metrics` option; empty: `config.metrics`), fractions in [0, 1],
from `research.metrics.squad` (the official scripts' logic):
`exact_match`, `f1`; v2.0 also `has_ans_exact_match`, `has_ans_f1`,
`no_ans_exact_match`, `no_ans_f1` at `null_threshold` (option, default 0.0)
and `best_exact_match`, `best_f1` with `best_null_threshold`, the
threshold that maximises F1 on this split: choose it on dev and pass it to
`research.predict --null_threshold` for other data. `write` puts
predictions.json (and null_odds.json) in a directory.
"""

from __future__ import annotations

import json
import os

import numpy as np

from research.metrics import squad
from research.metrics import squad_decoding
from research.evaluators import common

METRICS = ("exact_match", "f1", "has_ans_exact_match", "has_ans_f1",
           "no_ans_exact_match", "no_ans_f1", "best_exact_match", "best_f1",
           "best_null_threshold")
# decode's threshold for "always the best span" (odds are +inf only where no
# span exists, and those stay "").
_NEVER_NULL = float(np.finfo(np.float64).max)
# Official v2.0 script keys -> ours.
_V2_KEYS = {"exact": "exact_match", "f1": "f1",
            "HasAns_exact": "has_ans_exact_match", "HasAns_f1": "has_ans_f1",
            "NoAns_exact": "no_ans_exact_match", "NoAns_f1": "no_ans_f1",
            "best_exact": "best_exact_match", "best_f1": "best_f1"}


class Evaluator(common.Evaluator):
  """See the module docstring."""
  CONFIG = {**common.Evaluator.CONFIG, "n_best": 20, "max_answer_length": 30,
            "null_threshold": 0.0}
  METRICS = METRICS
  WRITE_OPTIONS = ("null_threshold",)

  @property
  def version_2(self) -> bool:
    return bool(self.task.options.get("version_2", False))

  def _windows(self, params, frozen):
    """Every window's logits and spans, padded to [F, L], and the totals."""
    rows, totals = [], []
    for _, out in self.outputs(params, frozen):
      totals.append(out)
      p = out["predictions"]
      for b in np.flatnonzero(out["batch_weights"] > 0):
        n = int(out["lengths"][b])
        rows.append((p["start_logits"][b, :n], p["end_logits"][b, :n],
                     p["offset_start"][b, :n], p["offset_end"][b, :n],
                     int(p["example_index"][b]), int(p["cls_index"][b])))
    width = max((len(r[0]) for r in rows), default=1)
    pad = lambda i, fill, dtype: np.stack([  # pylint: disable=unnecessary-lambda-assignment
        np.pad(r[i].astype(dtype), (0, width - len(r[i])),
               constant_values=fill) for r in rows])
    spans = np.stack([pad(2, -1, np.int64), pad(3, -1, np.int64)], axis=-1)
    return {"start": pad(0, 0.0, np.float64), "end": pad(1, 0.0, np.float64),
            "spans": spans, "context": spans[..., 0] >= 0,
            "example": np.asarray([r[4] for r in rows]),
            "cls": np.asarray([r[5] for r in rows])}, totals

  def decode(self, params, frozen):
    """(`squad_decoding.Decoded` with raw best spans, totals).

    The predictions are each question's best span ("" only when no span is
    possible); `answers` applies a null threshold to them (v2.0).
    """
    w, totals = self._windows(params, frozen)
    ex = self.split.examples
    decoded = squad_decoding.decode(
        w["start"], w["end"], w["spans"], w["context"], w["example"],
        ex["context"].tolist(), ex["id"].tolist(), cls_index=w["cls"],
        n_best=self.options["n_best"],
        max_answer_length=self.options["max_answer_length"],
        version_2=self.version_2, null_threshold=_NEVER_NULL)
    return decoded, totals

  @staticmethod
  def answers(decoded, null_threshold) -> dict:
    """{question id: answer}, "" where null_odds > null_threshold (v2.0)."""
    return {q: "" if decoded.null_odds.get(q, -np.inf) > null_threshold
            else a for q, a in decoded.predictions.items()}

  def gold(self) -> dict:
    ex = self.split.examples
    return {q: json.loads(a) for q, a in zip(ex["id"].tolist(),
                                             ex["answers"].tolist())}

  def scores(self, decoded) -> dict:
    """The official script's scores, fractions, under our metric names."""
    gold, threshold = self.gold(), self.options["null_threshold"]
    if not self.version_2:
      out = squad.evaluate_v1(gold, decoded.predictions)
      return {k: v / 100 for k, v in out.items()}
    out = squad.evaluate_v2(gold, decoded.predictions, decoded.null_odds,
                            threshold)
    results = {ours: out[key] / 100 for key, ours in _V2_KEYS.items()
               if key in out}
    results["best_null_threshold"] = float(out["best_f1_thresh"])
    return results

  def run(self, params, frozen):
    if not self.split.has_labels:
      return {}
    decoded, totals = self.decode(params, frozen)
    scores = self.scores(decoded)
    results = {"loss": common.loss(totals)}
    for name in self.metric_names(self.config, self.options):
      if name in scores:
        results[name] = scores[name]
    return results

  def predict(self, params, frozen) -> dict:
    """{"answers": [each question's answer, split order], "ids": [...],
    "null_odds": {id: odds} (v2.0)} at the `null_threshold` option."""
    decoded, _ = self.decode(params, frozen)
    answers = self.answers(decoded, self.options["null_threshold"])
    ids = self.split.examples["id"].tolist()
    return {"answers": [answers[q] for q in ids], "ids": ids,
            "null_odds": decoded.null_odds}

  def write(self, params, frozen, out_dir, *, summary=None,
            null_threshold=None) -> dict:
    """Writes predictions.json (and null_odds.json for v2.0) in `out_dir`.

    Args:
      params, frozen: the model's parts.
      out_dir: the directory (created).
      summary: the run's summary.json, if any: an unlabeled split takes the
        threshold the run last chose on its dev split (its
        `best_null_threshold`).
      null_threshold: v2.0's threshold; None: the best on this split when it
        is labeled (choose on dev), else the run's, else the
        `null_threshold` option.

    Returns:
      {"predictions": path, "null_odds": path or None, "null_threshold":
      the threshold used (None for v1.1), and the scores when labeled}.
    """
    decoded, _ = self.decode(params, frozen)
    scores = self.scores(decoded) if self.split.has_labels else {}
    if null_threshold is None and not self.split.has_labels:
      null_threshold = next((v for k, v in (summary or {}).items()
                             if k.endswith("best_null_threshold")), None)
    if null_threshold is None:
      null_threshold = scores.get("best_null_threshold",
                                  self.options["null_threshold"])
    os.makedirs(out_dir, exist_ok=True)
    out = {"predictions": os.path.join(out_dir, "predictions.json"),
           "null_odds": None, "null_threshold": None, **scores}
    if self.version_2:
      out["null_odds"] = os.path.join(out_dir, "null_odds.json")
      out["null_threshold"] = float(null_threshold)
      squad.write_null_odds(out["null_odds"], decoded.null_odds)
      squad.write_predictions(out["predictions"],
                              self.answers(decoded, null_threshold))
    else:
      squad.write_predictions(out["predictions"], decoded.predictions)
    return out
