"""Config schema (`default.py`) and the checks run before anything compiles.

The global fields are checked here against `default.get_config()`; each
plug-in checks its own sub-config: the task (`research/tasks/`,
`config.task_options`), the methods (`config.method_options`), the
evaluators (`config.evals`) and the sampler (`config.data.sampler_options`),
each against its module's `CONFIG` (`plugins.options`).
"""

from __future__ import annotations

import difflib
from typing import NamedTuple

import ml_collections

from research.configs import default
from research.configs import plugins
from research.configs.plugins import ConfigError

# Fields whose value must be one of a fixed set.
CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("xla", "cudnn"),
    "model.layers": ("auto", "scan", "unrolled"),
    "prng_impl": ("threefry", "rbg", "unsafe_rbg"),
    "model.pooling": ("auto", "pooler", "cls", "mean", "max"),
    "model.layer_norm": ("checkpoint", "post", "pre"),
    "model.bias": ("checkpoint", "on", "off"),
    "data.source": ("local", "tfds", "hf"),
    # conll, squad: CoNLL column files, official SQuAD JSON (their tasks).
    "data.format": ("auto", "csv", "tsv", "jsonl", "conll", "squad"),
    "data.bad_rows": ("error", "skip"),
    "optimizer.name": ("adamw", "adafactor", "lamb"),
    "optimizer.schedule": ("linear", "cosine", "constant"),
    "eval_metric_mode": ("max", "min"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
    "parallelism.strategy": ("jit", "pmap"),
    "parallelism.distributed": ("auto", "on", "off"),
    "cpu_malloc": ("auto", "retain", "default"),
}

# Sub-configs whose keys their plug-in checks, not the schema.
PLUGIN_FIELDS = ("task_options", "method_options", "evals",
                 "data.sampler_options")

POSITIVE = ("batch_size", "eval_batch_size", "data.max_length",
            "data.bucket_multiple",
            "data.examples_per_row", "optimizer.grad_accum_steps",
            "log_every_steps")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    name = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)) and v and \
        name not in PLUGIN_FIELDS:
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def validate(config: ml_collections.ConfigDict):
  """Checks names, types and choices against `default.get_config()`, then
  each plug-in's own options.

  Returns:
    `Plugins(task, methods)`: the run's methods, built once here
    (`research.train.build` keeps these instances), and its task (without a
    tokenizer).

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
    if not plugins.type_ok(value, expected):
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
  accum = config.optimizer.grad_accum_steps
  if config.batch_size % accum:
    raise ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by "
        f"config.optimizer.grad_accum_steps={accum}")
  per_row = config.data.examples_per_row
  if (config.batch_size // accum) % per_row:
    raise ConfigError(
        f"config.data.examples_per_row={per_row} does not divide the "
        f"{'micro-' if accum > 1 else ''}batch of "
        f"{config.batch_size // accum} examples (config.batch_size"
        f"{' / optimizer.grad_accum_steps' if accum > 1 else ''})")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("set config.total_steps > 0 or config.num_epochs > 0")
  if config.data.source == "local" and not config.data.train_file:
    from research import tasks  # pylint: disable=import-outside-toplevel
    if tasks.load(config).load_data is None:  # else: the task's own input
      raise ConfigError("config.data.source='local' needs config.data.train_file")
  if config.data.source in ("tfds", "hf") and not config.data.name:
    raise ConfigError(f"config.data.source={config.data.source!r} needs "
                      "config.data.name (e.g. 'glue/sst2')")
  return _validate_plugins(config)


class Plugins(NamedTuple):
  task: object
  methods: list


def _validate_plugins(config) -> Plugins:
  """Each plug-in checks its own name and sub-config (imports them)."""
  # pylint: disable=import-outside-toplevel
  from research import evaluators, methods, tasks
  from research.data import samplers
  task = tasks.load(config)
  loaded = methods.load(config, task)
  methods.check_data_seams(loaded, task)
  evaluators.validate(config, task)
  sampler, sampler_options = methods.sampler(loaded, config.data.sampler,
                                             config.data.sampler_options)
  if sampler == "auto":
    sampler = "shuffle" if config.data.examples_per_row > 1 else "bucketed"
  plugins.options(sampler_options,
                  getattr(samplers.module(sampler), "CONFIG", {}),
                  "config.data.sampler_options", f"sampler {sampler!r}")
  return Plugins(task, loaded)
