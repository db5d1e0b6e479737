"""Config schema (`default.py`) and the checks run before anything compiles."""

from __future__ import annotations

import difflib

import ml_collections

from research.configs import default

# Fields whose value must be one of a fixed set.
CHOICES = {
    "task": ("sequence_classification", "token_classification",
             "question_answering", "masked_lm"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("xla", "cudnn"),
    "data.source": ("local", "tfds", "hf"),
    "data.format": ("auto", "csv", "tsv", "jsonl"),
    "data.bad_rows": ("error", "skip"),
    "optimizer.name": ("adamw", "adafactor", "lamb"),
    "optimizer.schedule": ("linear", "cosine", "constant"),
    "eval_metric_mode": ("max", "min"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
    "parallelism.strategy": ("jit", "pmap"),
    "parallelism.distributed": ("auto", "on", "off"),
    "cpu_malloc": ("auto", "retain", "default"),
}

POSITIVE = ("batch_size", "eval_batch_size", "data.max_length",
            "data.examples_per_row", "optimizer.grad_accum_steps",
            "log_every_steps")


class ConfigError(ValueError):
  """A config field with a wrong name, type or value."""


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    name = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)) and v:
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def _type_ok(value, expected):
  if isinstance(expected, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(expected, bool)
  if isinstance(expected, float):
    return isinstance(value, (int, float))
  if isinstance(expected, (tuple, list)):
    return isinstance(value, (tuple, list))
  if isinstance(expected, ml_collections.ConfigDict):  # empty sub-dict
    return isinstance(value, (ml_collections.ConfigDict, dict))
  return isinstance(value, type(expected))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks names, types and choices against `default.get_config()`.

  Raises:
    ConfigError: naming the field and the nearest valid name or the valid
      values.
  """
  schema = _flatten(default.get_config())
  given = _flatten(config)
  for name, value in given.items():
    if name not in schema:
      near = difflib.get_close_matches(name, schema, n=1, cutoff=0.6)
      hint = f"; did you mean config.{near[0]}?" if near else ""
      raise ConfigError(f"config.{name} is not a known field{hint} "
                        "(all fields: research/configs/default.py)")
    expected = schema[name]
    if not _type_ok(value, expected):
      raise ConfigError(
          f"config.{name}={value!r} has type {type(value).__name__}; expected "
          f"{type(expected).__name__} (default {expected!r})")
  for name, valid in CHOICES.items():
    if given.get(name, schema[name]) not in valid:
      raise ConfigError(f"config.{name}={given[name]!r}; valid: "
                        f"{', '.join(valid)}")
  for name in POSITIVE:
    if given.get(name, schema[name]) <= 0:
      raise ConfigError(f"config.{name}={given[name]!r} must be positive")
  if config.eval_metric not in (*config.metrics, "loss"):
    raise ConfigError(
        f"config.eval_metric={config.eval_metric!r} is not computed; valid: "
        f"{', '.join((*config.metrics, 'loss'))} (config.metrics lists them)")
  accum = config.optimizer.grad_accum_steps
  if config.batch_size % accum:
    raise ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by "
        f"config.optimizer.grad_accum_steps={accum}")
  per_row = config.data.examples_per_row
  if per_row > 1 and config.task != "sequence_classification":
    raise ConfigError(f"config.data.examples_per_row={per_row}: packing is "
                      "for task sequence_classification; set it to 1")
  if (config.batch_size // accum) % per_row:
    raise ConfigError(
        f"config.data.examples_per_row={per_row} does not divide the "
        f"{'micro-' if accum > 1 else ''}batch of "
        f"{config.batch_size // accum} examples (config.batch_size"
        f"{' / optimizer.grad_accum_steps' if accum > 1 else ''})")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("set config.total_steps > 0 or config.num_epochs > 0")
  if not 1 <= len(config.data.text_fields) <= 2:
    raise ConfigError(f"config.data.text_fields={tuple(config.data.text_fields)!r}"
                      " must name one text column or a pair")
  if config.data.source == "local" and not config.data.train_file:
    raise ConfigError("config.data.source='local' needs config.data.train_file")
  if config.data.source in ("tfds", "hf") and not config.data.name:
    raise ConfigError(f"config.data.source={config.data.source!r} needs "
                      "config.data.name (e.g. 'glue/sst2')")
