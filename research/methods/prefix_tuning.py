"""Prefix tuning: trained key/value prefixes in every attention layer.

Li and Liang (2021), "Prefix-Tuning: Optimizing Continuous Prompts for
Generation": every layer's attention also attends to `length` trained keys
and values (`research.methods.peft.prefix.PrefixEncoder`, through the model's
`prefix_kv` hook), optionally re-parameterised by an MLP during training
(`projection`, PEFT's `prefix_projection`). The encoder's weights are
frozen; the prefixes and the task head are trained.

    config.methods = ("prefix_tuning",)
    config.method_options.prefix_tuning = dict(length=20, projection=False)

Positions are not shifted by the prefix (PEFT's `past_key_values` path
shifts them); the model's structure differs from a `transformers` BERT, so
a run's prefixes live in its checkpoints only.
"""

from flax import nnx

from research import methods
from research.methods import peft
from research.configs.plugins import ConfigError
from research.methods.peft import prefix

CONFIG = {"length": 20, "projection": False, "projection_size": 512,
          "head": True, "pooler": False}


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = CONFIG

  def __init__(self, config, **options):
    super().__init__(config, **options)
    for field in ("length", "projection_size"):
      if int(options[field]) < 1:
        raise ConfigError(f"config.method_options.prefix_tuning.{field}="
                          f"{options[field]!r}: must be >= 1")

  def adapt_model(self, model):
    o = self.options
    # The seed differs from the head's (methods.init_seed), so prefixes and
    # head are drawn independently.
    model.bert.prefix_encoder = prefix.PrefixEncoder(
        model.cfg, int(o["length"]), projection=bool(o["projection"]),
        projection_size=int(o["projection_size"]),
        rngs=nnx.Rngs(params=methods.init_seed(self.config) + 1))
    return model

  def export_model(self, model):
    raise ValueError(f"method {self.name!r} adds layers a transformers BERT "
                     "does not have: a Hugging Face directory cannot hold "
                     "this run; use its checkpoints (research.restore)")

  def setup(self, context):
    peft.check_pooler(self, context)

  def trainable(self):
    return peft.any_of(prefix.PrefixParam,
                       peft.saved_modules(self.options))
