"""Evaluators: one module per type, named in the config, as in big_vision.

`config.evals` maps a name to an evaluator's config, e.g.

  config.evals = {"dev": {"type": "sequence", "split": "validation",
                          "metrics": ("accuracy", "f1")}}

`type` is `research/evaluators/<type>.py` (a dotted name is a module path),
whose `Evaluator(name=, task=, split=, batcher=, make_step=, sharding=,
config=, **options)` has `run(params, frozen) -> {metric: value}` over its split (and
`predict(params, frozen)`: per-example outputs in the split's order). Its
options are checked against the module's `Evaluator.CONFIG`. An empty
`config.evals` (the default) takes the task's `default_evals`: one evaluator
per evaluation split, named as the split, so configs written before
evaluators existed log the same keys: `eval/<metric>` with one evaluator,
`eval/<name>/<metric>` with several. `config.eval_metric` selects the best
checkpoint: a metric of the first evaluator, or "<evaluator>/<metric>".
Evaluators run in the order of `config.evals`' keys, which a ConfigDict
sorts by name.
"""

import ml_collections

from research.configs import plugins
from research.configs.plugins import ConfigError

PACKAGE = "research.evaluators"


def module(type_name, name="?"):
  """The evaluator module of a type (ConfigError listing the valid ones)."""
  return plugins.module(PACKAGE, type_name, f"config.evals.{name}.type",
                        "Evaluator")


def configs(config, task) -> dict:
  """{name: {"type": ..., "split": ..., options...}} of the run's evaluators.

  From `config.evals`, or the task's defaults over the configured
  evaluation splits (no data is read).
  """
  from research import data  # pylint: disable=import-outside-toplevel
  evals = config.get("evals")
  if isinstance(evals, ml_collections.ConfigDict):
    evals = evals.to_dict()
  if not evals:
    return task.default_evals(data.eval_split_names(config.data))
  out = {}
  for name, cfg in evals.items():
    cfg = dict(cfg)
    if "type" not in cfg:
      raise ConfigError(f"config.evals.{name} has no type (an evaluator "
                        f"module: {', '.join(plugins.available(PACKAGE))})")
    out[name] = cfg
  return out


def options(name, cfg) -> dict:
  """An evaluator config's options, checked against its module's CONFIG."""
  evaluator = module(cfg["type"], name).Evaluator
  given = {k: v for k, v in cfg.items() if k != "type"}
  return plugins.options(given, evaluator.CONFIG, f"config.evals.{name}",
                         f"evaluator {cfg['type']!r}")


def prefix(name, names) -> str:
  """The metric key prefix: "eval/" alone, "eval/<name>/" among several."""
  return "eval/" if len(names) == 1 else f"eval/{name}/"


def _best(config, names):
  """(evaluator name or None, metric) that config.eval_metric names."""
  evaluator, sep, metric = config.eval_metric.rpartition("/")
  if sep:
    return evaluator, metric
  return (names[0] if names else None), metric


def best_metric_key(config, names) -> str:
  """The logged key of config.eval_metric: "metric" of the first evaluator,
  or "<evaluator>/<metric>"."""
  evaluator, metric = _best(config, names)
  return (prefix(evaluator, names) if evaluator else "eval/") + metric


def validate(config, task) -> None:
  """Checks every evaluator's type and options, and config.eval_metric.

  Raises:
    ConfigError: naming the field and the valid values.
  """
  cfgs = configs(config, task)
  for name, cfg in cfgs.items():
    opts = options(name, cfg)
    if not opts.get("split"):
      raise ConfigError(f"config.evals.{name}.split is not set (an "
                        "evaluation split, e.g. 'validation')")
  if cfgs:
    name, metric = _best(config, list(cfgs))
    if name not in cfgs:
      raise ConfigError(f"config.eval_metric={config.eval_metric!r}: no "
                        f"evaluator {name!r}; evaluators: {', '.join(cfgs)}")
    cfg = cfgs[name]
    valid = (*module(cfg["type"], name).Evaluator.metric_names(
        config, options(name, cfg)), "loss")
    if metric not in valid:
      raise ConfigError(
          f"config.eval_metric={config.eval_metric!r} is not computed; "
          f"valid: {', '.join(valid)} (config.metrics lists them)")


def build(config, task, splits, batchers, make_step, sharding) -> dict:
  """The run's evaluators, {name: Evaluator}, in config order.

  Args:
    config: the run config.
    task: the run's task.
    splits: {split name: TokenizedSplit} of the evaluation splits.
    batchers: {split name: Batcher} of the same.
    make_step: `(logits: bool) -> eval step` (`research.train` shares one).
    sharding: the batch sharding.
  """
  from research.evaluators import common  # pylint: disable=import-outside-toplevel
  out = {}
  for name, cfg in configs(config, task).items():
    opts = options(name, cfg)
    split = opts.pop("split")
    if split not in splits:
      raise ConfigError(f"config.evals.{name}.split={split!r} is not an "
                        f"evaluation split; the data has: "
                        f"{', '.join(splits) or 'none'}")
    cls = module(cfg["type"], name).Evaluator
    if issubclass(cls, common.Evaluator):
      plugins.check_overrides(cls, common.Evaluator, ("run",),
                              f"config.evals.{name}.type", cfg["type"])
    out[name] = cls(
        name=name, task=task, split=splits[split], batcher=batchers[split],
        make_step=make_step, sharding=sharding, config=config, **opts)
  return out
