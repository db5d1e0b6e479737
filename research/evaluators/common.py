"""What every evaluator shares: the batches of its split through the step.

`Evaluator.outputs(params, frozen)` runs the jitted evaluation step
(`research.training.steps.make_eval_step` over the task's `eval_forward`) on
each batch of the split and yields this host's batch with the step's outputs
as numpy (replicated: the same on every host). Evaluators keep what they need per example, so
batches of different widths never meet in one array: token-level outputs
are cut into ragged per-example arrays first.
"""

from __future__ import annotations

from jax.experimental import multihost_utils

from research import parallelism
from research.configs.plugins import ConfigError
from research.metrics import common as metrics_lib


class Evaluator:
  """Base of the evaluators.

  Args:
    name: the evaluator's name (its metrics' key prefix).
    task: the run's task.
    split: its `TokenizedSplit` (the `split` option names it).
    batcher: the split's evaluation `Batcher`.
    make_step: `(logits: bool) -> jitted (params, frozen, batch, index) ->
      outputs` (shared between evaluators).
    sharding: the batch sharding (`parallelism.batch_sharding(mesh)`).
    config: the run config.
    context: the run's `methods.Context` (tokenizer, model config, ...), or
      None for an evaluator built outside a run.
    **options: this type's options (`CONFIG`).
  """
  # Options and defaults; `split` names the evaluation split. `logits`:
  # `predict` also returns the model's raw outputs (for ensembles).
  # `metrics`: what `run` computes besides loss; empty: config.metrics.
  CONFIG = {"split": "", "logits": False, "metrics": ()}
  # The metric names `run` knows; None: any of research.metrics.common.
  METRICS = None

  # Options `write` takes from `research.predict`'s command line.
  WRITE_OPTIONS = ()

  def __init__(self, *, name, task, split, batcher, make_step, sharding,
               config, context=None, **options):
    self.name = name
    self.context = context
    self.task = task
    self.split = split
    self.batcher = batcher
    self.config = config
    # Defaults for options not given (an evaluator built outside the config).
    self.options = {**self.CONFIG, **options}
    self.step = make_step(bool(options.get("logits", False)))
    self.sharding = sharding

  @classmethod
  def metric_names(cls, config, options) -> tuple:
    """The metrics `run` returns besides loss (ConfigError if unknown)."""
    names = tuple(options.get("metrics") or config.metrics)
    valid = cls.METRICS or tuple(metrics_lib.available())
    kind = cls.__module__.rsplit(".", 1)[-1]
    for name in names:
      if name not in valid:
        raise ConfigError(f"metric {name!r} of the {kind} evaluator is not "
                          f"known; valid: {', '.join(valid)} (config."
                          "metrics or config.evals.<name>.metrics)")
    return names

  def precompile(self, params, frozen) -> int:
    """Compiles the eval step for every batch width of the split.

    `params` and `frozen` may be `jax.ShapeDtypeStruct`s (with shardings):
    lowering reads shapes and shardings only, so this can run while the
    training step donates the real buffers. Later calls of the step run the
    executables (`steps.AheadOfTime`). Returns the number of widths
    compiled now.
    """
    calls, widths = [], set()
    for index, host in enumerate(self.batcher.eval_batches()):
      width = host["input_ids"].shape[1]
      if width not in widths:
        widths.add(width)
        calls.append((params, frozen,
                      parallelism.shard_batch(host, self.sharding), index))
    return self.step.compile_ahead(calls)["shapes"]

  def outputs(self, params, frozen):
    """Yields (host batch, step outputs as numpy) for each batch in order."""
    batches = parallelism.prefetch(self.batcher.eval_batches(), self.sharding,
                                   self.config.parallelism.prefetch)
    for index, (host, batch) in enumerate(batches):
      out = self.step(params, frozen, batch, index)
      # Global arrays -> numpy on every host (multi-host safe).
      yield host, multihost_utils.process_allgather(out, tiled=True)

  def run(self, params, frozen) -> dict:
    """{metric: value} over the split ({} when it has no labels)."""
    raise NotImplementedError


def loss(totals) -> float:
  """The weighted mean loss from per-batch (loss sum, weight) outputs."""
  loss_sum = sum(float(o["loss"]) for o in totals)
  weight = sum(float(o["weight"]) for o in totals)
  return loss_sum / max(weight, 1e-12)
