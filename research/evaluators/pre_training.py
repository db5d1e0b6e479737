"""BERT pre-training: masked-LM metrics plus next-sentence prediction.

The `token` evaluator's metrics over the masked tokens (`accuracy`,
`perplexity`; `loss` is the masked-LM loss) and, from the per-batch sums of
`masked_lm.nsp_sums` (the task with `next_sentence=True`), `nsp_accuracy`
(the arg-max of `seq_relationship` against the pair's label) and `nsp_loss`
(the mean cross-entropy) over the split's real rows.
"""

from __future__ import annotations

from research.configs.plugins import ConfigError
from research.evaluators import token
from research.models import heads

NSP_METRICS = ("nsp_accuracy", "nsp_loss")


class Evaluator(token.Evaluator):
  """See the module docstring."""
  METRICS = token.METRICS + NSP_METRICS

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    names = self.metric_names(self.config, self.options)
    self.nsp = [n for n in NSP_METRICS if n in names]
    if self.nsp and self.task.HEAD is not heads.PreTraining:
      raise ConfigError(
          f"config.evals.{self.name}.metrics: {', '.join(self.nsp)} need the "
          "NSP head (task masked_lm with config.task_options.next_sentence="
          f"True); the task's head is {self.task.HEAD!r}")

  def scores(self, preds, labels, totals) -> dict:
    results = super().scores(preds, labels, totals)
    if not self.nsp:
      return results
    count = max(sum(float(o["nsp_count"]) for o in totals), 1e-12)
    nsp = {"nsp_accuracy": sum(float(o["nsp_correct"]) for o in totals),
           "nsp_loss": sum(float(o["nsp_loss"]) for o in totals)}
    results.update({n: nsp[n] / count for n in self.nsp})
    return results
