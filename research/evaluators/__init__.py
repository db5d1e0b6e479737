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

import logging
import threading

import jax
import ml_collections

from research.configs import plugins
from research.configs.plugins import ConfigError

PACKAGE = "research.evaluators"
log = logging.getLogger(__name__)


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


def build(config, task, splits, batchers, make_step, sharding,
          context=None) -> dict:
  """The run's evaluators, {name: Evaluator}, in config order.

  Args:
    config: the run config.
    task: the run's task.
    splits: {split name: TokenizedSplit} of the evaluation splits.
    batchers: {split name: Batcher} of the same.
    make_step: `(logits: bool) -> eval step` (`research.train` shares one).
    sharding: the batch sharding.
    context: the run's `methods.Context`, given to every evaluator.
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
        make_step=make_step, sharding=sharding, config=config,
        context=context, **opts)
  return out


def precompile_async(evaluators, params, frozen) -> threading.Thread:
  """Compiles every evaluator's eval step in a background thread.

  Started before step 1, so the first evaluation finds its programs
  compiled instead of stalling the run by their compile (on an H200 the
  eval of 872 sentences took 9.3 s with its compile, the Trainer's 2.0 s).
  The thread sees abstract values only (the training step donates the
  buffers); XLA compiles outside the GIL, beside the training steps.
  """
  abstract = lambda tree: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x, tree)
  params, frozen = abstract(params), abstract(frozen)

  def compile_all():
    try:
      for evaluator in evaluators.values():
        evaluator.precompile(params, frozen)
    except Exception as e:  # pylint: disable=broad-except
      # The evaluation compiles on first use instead; nothing is lost.
      log.warning("compiling the evaluation ahead failed (%s: %s); it will "
                  "compile at the first evaluation", type(e).__name__, e)

  thread = threading.Thread(target=compile_all, name="eval-precompile",
                            daemon=True)
  thread.start()
  return thread
