"""Gradual magnitude pruning (Zhu & Gupta 2017) of the encoder's dense layers.

"To prune, or not to prune: exploring the efficacy of pruning for model
compression": during fine-tuning, each target layer's smallest-magnitude
weights are removed on a cubic schedule until `sparsity` of them are zero
(`research.methods.pruning.schedule`); the kept weights go on training.

    config.methods = ("magnitude_pruning",)
    config.method_options.magnitude_pruning = dict(sparsity=0.9)

Options:
  sparsity          s_f, the fraction of each target layer's weights removed
  initial_sparsity  s_i, at the schedule's first step
  begin, end        the schedule's first and last update, as fractions of the
                    run's updates (t0 and t0 + n dt; after `end` the mask is
                    fixed and the rest of the run fine-tunes the kept weights)
  frequency         dt: updates between two mask updates
  target_modules    dense layers by `make_dense` name or suffix (default:
                    Q, K, V, attention output and the FFN of every layer)

The layers are `research.methods.pruning.layers.PrunedDense` (through the
dense-layer factory); the pruned weights are exactly 0 in the checkpoint's
kernels, so export, predict and the benchmarks read a pruned model. The
sparsity gives no speed on CPU or GPU without sparse kernels (the matmuls
are as large as the dense model's).
"""

from research import methods
from research.configs.plugins import ConfigError
from research.methods import peft
from research.methods.peft import layers as peft_layers
from research.methods.pruning import layers, schedule

CONFIG = {"sparsity": 0.5, "initial_sparsity": 0.0, "begin": 0.1, "end": 0.7,
          "frequency": 10, "target_modules": layers.DEFAULT_TARGETS}


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = CONFIG
  NAME = "magnitude_pruning"
  MOVEMENT = False

  def __init__(self, config, **options):
    super().__init__(config, **options)
    field = f"config.method_options.{self.NAME}"
    o = self.options
    if not 0.0 <= float(o["initial_sparsity"]) <= float(o["sparsity"]) < 1.0:
      raise ConfigError(
          f"{field}: need 0 <= initial_sparsity ({o['initial_sparsity']}) <= "
          f"sparsity ({o['sparsity']}) < 1")
    if not 0.0 <= float(o["begin"]) <= float(o["end"]) <= 1.0:
      raise ConfigError(f"{field}: need 0 <= begin ({o['begin']}) <= end "
                        f"({o['end']}) <= 1 (fractions of the run's updates)")
    if int(o["frequency"]) < 1:
      raise ConfigError(f"{field}.frequency={o['frequency']}: must be >= 1")
    if config.optimizer.grad_accum_steps > 1:
      raise ConfigError(
          f"config.methods has {self.NAME!r}, whose masks change once per "
          "optimiser call: set config.optimizer.grad_accum_steps=1 "
          f"(got {config.optimizer.grad_accum_steps})")
    self.targets = peft_layers.check_targets(o["target_modules"],
                                             f"{field}.target_modules")

  def dense_factory(self, factory):
    return peft.targeted_factory(factory, self.targets, layers.PrunedDense,
                                 scores=self.MOVEMENT)

  def export_model(self, model):
    """The masks folded into the kernels: the export holds the zeros."""
    return layers.merge(model)

  def optimizer(self, tx, total_steps):
    o = self.options
    return schedule.pruning(
        tx, final=float(o["sparsity"]), initial=float(o["initial_sparsity"]),
        begin=round(float(o["begin"]) * total_steps),
        end=round(float(o["end"]) * total_steps),
        frequency=int(o["frequency"]), total_steps=int(total_steps),
        movement=self.MOVEMENT)
