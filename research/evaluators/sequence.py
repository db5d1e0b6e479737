"""One prediction per example against its label: classification, regression.

Metrics are `research.metrics.common` functions by name (`metrics`
option; empty: `config.metrics`), on the task's predictions (class ids,
values, or one row per example such as multi-hot labels) weighted by the
task's example weights (broadcast over a row).
"""

from __future__ import annotations

import numpy as np

from research.metrics import common as metrics_lib
from research.evaluators import common


class Evaluator(common.Evaluator):
  """See the module docstring."""

  def _collect(self, params, frozen):
    """Per-batch outputs with the padding rows dropped, concatenated."""
    kept, totals = [], []
    for host, out in self.outputs(params, frozen):
      del host
      totals.append(out)
      real = out.pop("batch_weights") > 0
      kept.append({k: v[real] for k, v in out.items()
                   if k not in ("loss", "weight")})
    # Per-example outputs: one shape per example, whatever the batch width.
    joined = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
    return joined, totals

  def run(self, params, frozen):
    if not self.split.has_labels:
      return {}
    out, totals = self._collect(params, frozen)
    labels, weights = out["labels"], out["weights"]
    weights = np.broadcast_to(
        weights.reshape(weights.shape + (1,) * (labels.ndim - weights.ndim)),
        labels.shape)
    results = {"loss": common.loss(totals)}
    results.update(metrics_lib.compute(
        self.metric_names(self.config, self.options), out["predictions"],
        labels, weights))
    return results

  def predict(self, params, frozen) -> dict:
    """{"predictions": [n, ...]} (and "logits") of every example, in order."""
    out, _ = self._collect(params, frozen)
    return {k: v for k, v in out.items() if k in ("predictions", "logits")}
