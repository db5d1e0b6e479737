"""Quantisation-aware training (int8) with google's qwix.

The loaded model is wrapped by qwix's `QtProvider`
(`research.methods.quantization.int8.qat`): every dense layer's matmul runs
on int8-quantised weights and activations in the forward pass (per output
channel and per token, absmax), and the gradient passes the rounding
straight through, so fine-tuning learns weights that lose little when they
are quantised. Training and evaluation both run the simulated int8 model;
the checkpoints and the export hold float32 weights, and
`research.compress --quantize int8` quantises them for serving
(post-training quantisation of the QAT weights).

    config.methods = ("qat",)
    config.method_options.qat = dict(scheme="int8")   # or "int8_weights"

`module_path`: a regex of the layers quantised ("bert/layers/0/attention/
query", ...; default all dense layers).
"""

from research import methods
from research.configs.plugins import ConfigError
from research.methods.quantization import int8

CONFIG = {"scheme": "int8", "module_path": ".*"}


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = CONFIG

  def __init__(self, config, **options):
    super().__init__(config, **options)
    try:
      int8.check_scheme(self.options["scheme"], "config.method_options.qat.scheme")
    except ValueError as e:
      raise ConfigError(str(e)) from None

  def adapt_model(self, model):
    return int8.qat(model, self.options["scheme"], self.options["module_path"])
