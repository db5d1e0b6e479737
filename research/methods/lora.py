"""LoRA: a trained low-rank update beside every frozen target weight.

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models". Each
target dense layer computes `W x + (alpha / r) B A x` with W frozen, A [in, r]
and B [r, out] trained and B starting at zero (the model starts as the
pre-trained one). The task head is trained whole (PEFT's
`modules_to_save`). Checkpoints hold A, B, the head and their optimiser
state; `research.methods.peft.layers.merge` folds B A into W for inference and
`research.methods.peft.hf_peft.export` writes a directory Hugging Face PEFT loads.

    config.methods = ("lora",)
    config.method_options.lora = dict(r=8, alpha=16, target_modules=("query", "value"))

The options are PEFT's `LoraConfig`: `r`, `lora_alpha` (here `alpha`),
`lora_dropout` (`dropout`, on the layer's input), `target_modules` (layer
names of `research.models.bert.make_dense` or their last part, or
"all-linear": every encoder layer), `modules_to_save` (`head`).
"""

from flax import nnx

from research import methods
from research.methods import peft
from research.configs.plugins import ConfigError
from research.methods.peft import layers

CONFIG = {"r": 8, "alpha": 16.0, "dropout": 0.0,
          "target_modules": ("query", "value"), "head": True, "pooler": False}


def check_rank_options(options, name, rank_fields=("r",)):
  """ConfigError naming the field for a bad rank or dropout rate."""
  for field in rank_fields:
    if int(options[field]) < 1:
      raise ConfigError(f"config.method_options.{name}.{field}="
                        f"{options[field]!r}: must be >= 1")
  if not 0.0 <= float(options["dropout"]) < 1.0:
    raise ConfigError(f"config.method_options.{name}.dropout="
                      f"{options['dropout']!r}: must be in [0, 1)")
  return layers.check_targets(options["target_modules"],
                              f"config.method_options.{name}.target_modules")


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = CONFIG
  LAYER = layers.LoRADense
  NAME = "lora"

  def __init__(self, config, **options):
    super().__init__(config, **options)
    self.targets = check_rank_options(options, self.NAME,
                                      self.check_rank_fields())

  def check_rank_fields(self):
    return ("r",)

  def layer_options(self) -> dict:
    o = self.options
    return {"lora_rank": int(o["r"]), "lora_alpha": float(o["alpha"]),
            "lora_dropout": float(o["dropout"])}

  def dense_factory(self, factory):
    return peft.targeted_factory(factory, self.targets, self.LAYER,
                                 **self.layer_options())

  def setup(self, context):
    peft.check_pooler(self, context)

  def trainable(self):
    return peft.any_of(nnx.LoRAParam, peft.saved_modules(self.options))

  def wrap_loss(self, loss_fn):
    return peft.with_dropout(loss_fn) if self.options["dropout"] > 0 else loss_fn

  def export_model(self, model):
    """B A folded into each target kernel: a plain BERT again."""
    return layers.merge(model)

  def export_adapters(self, model, out_dir, context, step):
    """The adapters and head as a Hugging Face PEFT directory."""
    from research.methods.peft import hf_peft  # pylint: disable=import-outside-toplevel
    options = dict(self.options)
    options.setdefault("total_step", context.config.get("total_steps", 0)
                       or step)
    hf_peft.export(model, out_dir, task=context.task.HEAD, options=options,
                   base_model_name_or_path=context.config.model.name)
    return f"the {self.name} adapters"
