"""Bottleneck adapters: Houlsby et al. (2019) or Pfeiffer et al. (2020).

A small MLP `y + up(act(down(y)))` (width hidden / reduction_factor) after a
sub-layer's output projection, before its dropout, residual add and
LayerNorm (`research.methods.peft.layers.AdapterDense`); `up` starts at zero, so the
model starts as the pre-trained one. "houlsby" puts one after the attention
output and one after the feed-forward output; "pfeiffer" only after the
feed-forward output. Trained: the adapters, the LayerNorms (as Houlsby et
al. do; `layer_norm=False` freezes them) and the task head.

    config.methods = ("adapters",)
    config.method_options.adapters = dict(kind="houlsby", reduction_factor=16)

The model's structure differs from a `transformers` BERT, so a run exports
its adapters in its checkpoints only (`research.export` refuses a plain
Hugging Face directory for it).
"""

from research import methods
from research.methods import peft
from research.configs.plugins import ConfigError
from research.methods.peft import layers

# kind -> the dense layers (make_dense names) followed by an adapter.
KINDS = {"houlsby": ("attention.output", "output"), "pfeiffer": ("output",)}
CONFIG = {"kind": "houlsby", "reduction_factor": 16, "activation": "relu",
          "layer_norm": True, "head": True, "pooler": False}


def _exact(name, targets):
  return name in targets


def is_layer_norm(path, value) -> bool:
  """An nnx filter: the LayerNorms' scales and biases."""
  del value
  return any(str(p).endswith("layer_norm") for p in path)


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = CONFIG

  def __init__(self, config, **options):
    super().__init__(config, **options)
    field = "config.method_options.adapters"
    if options["kind"] not in KINDS:
      raise ConfigError(f"{field}.kind={options['kind']!r}; valid: "
                        f"{', '.join(KINDS)}")
    if options["activation"] not in layers.ADAPTER_ACTIVATIONS:
      raise ConfigError(f"{field}.activation={options['activation']!r}; "
                        f"valid: {', '.join(layers.ADAPTER_ACTIVATIONS)}")
    if int(options["reduction_factor"]) < 1:
      raise ConfigError(f"{field}.reduction_factor must be >= 1")

  def dense_factory(self, factory):
    o = self.options
    return peft.targeted_factory(
        factory, KINDS[o["kind"]], layers.AdapterDense, match=_exact,
        reduction_factor=int(o["reduction_factor"]), activation=o["activation"])

  def export_model(self, model):
    raise ValueError(f"method {self.name!r} adds layers a transformers BERT "
                     "does not have: a Hugging Face directory cannot hold "
                     "this run; use its checkpoints (research.restore)")

  def setup(self, context):
    peft.check_pooler(self, context)

  def trainable(self):
    o = self.options
    return peft.any_of(layers.AdapterParam,
                       is_layer_norm if o["layer_norm"] else None,
                       peft.saved_modules(o))
