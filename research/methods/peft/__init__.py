"""Parameter-efficient fine-tuning: layers, rank allocation, PEFT interop.

The methods themselves are plug-ins (`research/methods/lora.py`,
`adalora.py`, `adapters.py`, `prefix_tuning.py`, `bitfit.py`); this package
holds what they build on:

  layers.py      LoRADense, AdaLoRADense, AdapterDense (dense layers built by
                 the model's `dense_factory`), merge / unmerge
  allocation.py  AdaLoRA's importance-based rank allocation, an optax wrapper
  prefix.py      PrefixEncoder: per-layer key/value prefixes (MLP option)
  hf_peft.py     Hugging Face PEFT adapter directories: export and import
  report.py      trainable parameters, checkpoint size

and the pieces the methods share (below).
"""

from __future__ import annotations

import jax
from flax import nnx

from research.configs.plugins import ConfigError
from research.methods.peft import layers

# The key stream of the adapters' input dropout, apart from the model's.
DROPOUT_STREAM = 0x7FFFFFFD


def targeted_factory(factory, targets, layer, match=layers.layer_name_matches,
                     **layer_options):
  """`factory` building `layer(**layer_options)` for the layers in `targets`.

  Args:
    factory: a dense factory (`research.models.bert.make_dense`'s signature).
    targets: layer names or suffixes.
    layer: the class built there (a `LoRADense`, `AdapterDense`, ...).
    match: `(name, targets) -> bool` (default: a name or its suffix).
    layer_options: its extra constructor arguments.
  """

  def make(*args, name, **kw):
    if match(name, targets):
      return factory(*args, name=name, layer=layer, **layer_options, **kw)
    return factory(*args, name=name, **kw)

  return make


def is_head(path, value) -> bool:
  """An nnx filter: the task head (every weight outside the encoder `bert`).

  What PEFT's `modules_to_save` trains for a classification task.
  """
  del value
  return path[0] != "bert"


def is_pooler(path, value) -> bool:
  """An nnx filter: BERT's pooler (dense + tanh on [CLS]).

  PEFT leaves it frozen unless `modules_to_save` names it. A checkpoint whose
  pooler was never trained (sentence-transformers models such as
  all-MiniLM-L6-v2, trained on mean pooling) gives a frozen pooler's output
  little of the sentence: train it with the head (`pooler=True`).
  """
  del value
  return tuple(path[:2]) == ("bert", "pooler")


def check_pooler(method, context) -> None:
  """ConfigError when a method's `pooler=True` names a pooler the model
  lacks: a sentence pooling other than BERT's ("cls", "mean", "max";
  `config.model.pooling`, whose `auto` is mean for sentence-transformers
  checkpoints) has no pooler weights to train."""
  if not method.options.get("pooler"):
    return
  bert = getattr(context.model, "bert", None)
  if bert is not None and bert.pooling is not None and bert.pooler is None:
    raise ConfigError(
        f"config.method_options.{method.name}.pooler=True trains BERT's "
        f"pooler, but this model pools with {bert.pooling!r} "
        "(config.model.pooling) and has none: set pooler=False, or "
        "config.model.pooling='pooler'")


def saved_modules(options):
  """The filter of what a method trains whole besides its own weights:
  the head (`options["head"]`) and the pooler (`options["pooler"]`)."""
  return any_of(is_head if options["head"] else None,
                is_pooler if options.get("pooler") else None)


def with_dropout(loss_fn):
  """`loss_fn` with the step's key given to the layers' input dropout.

  The layers' `DropoutState` (in the frozen part's non-parameter state) is
  switched on and keyed by `fold_in(key, DROPOUT_STREAM)` for this call
  only; evaluation never goes through here and runs without dropout.
  """

  def loss(trainable, frozen, batch, key):
    rest = layers.with_dropout_keys(
        frozen.rest, jax.random.fold_in(key, DROPOUT_STREAM))
    return loss_fn(trainable, frozen._replace(rest=rest), batch, key)

  return loss


def any_of(*filters):
  """An nnx filter: any of `filters` (None entries are skipped)."""
  return nnx.Any(*(f for f in filters if f is not None))
