"""Runs an experiment's hyper-parameter grid: one training run per point.

    python -m research.sweep --config experiments/glue_sst2.py \
        --workdir /tmp/glue/sst2
    python -m research.sweep --config experiments/glue_rte.py:model=bert-large-cased \
        --workdir /tmp/glue/rte_large --config.eval_batch_size=32
    python -m research.sweep --config experiments/glue_sst2.py \
        --workdir /shared/glue/sst2 --host_index=1 --num_hosts=4

The experiment module defines `get_sweep(arg=None)` (called with the same
`arg` as its `get_config`), which returns {config field: [values]}, e.g.
{"optimizer.learning_rate": [5e-5, 3e-5], "seed": [0, 1, 2]}. The runs are
the Cartesian product, in the order given (the last field varies fastest);
`--config.*` overrides apply to every run and may not name a swept field.

Run k goes to `<workdir>/<name>`, the name made of the swept values
(`lr=5e-05,seed=0`, see `run_name`), and is an ordinary
`research.train.train_and_evaluate` run with `wandb.group` = the sweep name
(the workdir's base name, unless config.wandb.group is set) and
`wandb.name` = the run name.

Hosts: with `--host_index=i --num_hosts=N` on each of N hosts, host i runs
runs i, i+N, ... as independent single-host jobs (jax.distributed is not
started). Without them the sweep starts like research.train: on a
multi-process launch (`launch.sh tpu|gpu`, config.parallelism.distributed)
every process takes part in every run, one after another, so the workdir
must be shared (as multi-host checkpoints need anyway); on one host it runs
them all. A run cannot be split off inside a distributed job: research.train
writes from process 0 and its checkpoints synchronise all processes.

Restarting the same command continues the sweep: a run whose directory holds
`sweep_done.json` (written once train_and_evaluate has returned, with the
config it ran) is skipped, an interrupted run resumes from its checkpoint, the
rest start. A run directory that holds a different config (other than the
wandb fields) is an error rather than a silent mix of two experiments.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.util
import itertools
import json
import logging
import os
import sys

import ml_collections

log = logging.getLogger("research.sweep")

DONE_FILE = "sweep_done.json"
# Short names for run directories; other fields go by their last component.
SHORT_NAMES = {
    "optimizer.learning_rate": "lr",
    "batch_size": "bs",
    "num_epochs": "epochs",
    "optimizer.weight_decay": "wd",
    "optimizer.warmup_proportion": "warmup",
    "model.hidden_dropout": "dropout",
}
# Fields that may differ between a run's first start and its restart: they
# name the run in W&B or move caches, and change no result.
IGNORED_FIELDS = ("wandb.", "data.cache_dir")


class SweepError(ValueError):
  """A bad grid, an override of a swept field, or a run directory mismatch."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid.

  Attributes:
    index: its position in the Cartesian product.
    name: its directory name under the sweep workdir.
    overrides: {dotted config field: value} of the swept fields.
  """
  index: int
  name: str
  overrides: dict


def _format_value(value):
  if isinstance(value, (list, tuple)):
    return "-".join(_format_value(v) for v in value)
  text = repr(value) if isinstance(value, float) else str(value)
  # A run name is a directory name: no separators or spaces.
  return text.replace("/", "_").replace(os.sep, "_").replace(" ", "")


def format_overrides(overrides):
  """`{"optimizer.learning_rate": 5e-05, "seed": 0}` -> `lr=5e-05,seed=0`.

  Fields go by their SHORT_NAMES entry or last component; when two fields
  would share a short name, both keep their full dotted names.
  """
  short = {k: SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in overrides}
  clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
  return ",".join(f"{k if short[k] in clashes else short[k]}={_format_value(v)}"
                  for k, v in overrides.items())


def run_name(overrides):
  """The directory name of the run with these swept values."""
  return format_overrides(overrides) or "default"


def _field(config, dotted):
  """The value of `config.<dotted>`; KeyError naming the nearest field."""
  node = config
  for i, part in enumerate(dotted.split(".")):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or \
        part not in node:
      prefix = ".".join(dotted.split(".")[:i])
      siblings = list(node.keys()) if isinstance(
          node, (ml_collections.ConfigDict, dict)) else []
      names = [f"{prefix}.{s}" if prefix else s for s in siblings]
      near = difflib.get_close_matches(dotted, names, n=1, cutoff=0.6)
      raise KeyError(f"config.{dotted} is not a config field" +
                     (f"; did you mean config.{near[0]}?" if near else ""))
    node = node[part]
  return node


def expand(grid, config):
  """The runs of `grid` (Cartesian product, last field fastest).

  Args:
    grid: {dotted config field: non-empty list of values}.
    config: the base config; every field of `grid` must exist in it.

  Returns:
    A list of `Run`.

  Raises:
    SweepError: an empty grid, an unknown field, an empty or repeated value
      list.
  """
  if not isinstance(grid, dict) or not grid:
    raise SweepError(f"get_sweep must return a non-empty dict {{config field: "
                     f"[values]}}, got {grid!r}")
  for key, values in grid.items():
    try:
      _field(config, key)
    except KeyError as e:
      raise SweepError(f"get_sweep: {e.args[0]}") from None
    if not isinstance(values, (list, tuple)) or not values:
      raise SweepError(f"get_sweep: {key} needs a non-empty list of values, "
                       f"got {values!r}")
    if len({_format_value(v) for v in values}) != len(values):
      raise SweepError(f"get_sweep: {key} repeats a value: {list(values)}")
  keys = list(grid)
  return [Run(i, run_name(dict(zip(keys, point))), dict(zip(keys, point)))
          for i, point in enumerate(itertools.product(*grid.values()))]


def host_runs(runs, host_index, num_hosts):
  """The runs of host `host_index` of `num_hosts`: i, i + N, i + 2N, ..."""
  if num_hosts < 1 or not 0 <= host_index < num_hosts:
    raise SweepError(f"--host_index={host_index} must be in [0, "
                     f"--num_hosts={num_hosts})")
  return runs[host_index::num_hosts]


def run_config(config, run, sweep_name):
  """A copy of `config` with the run's values and its W&B group and name."""
  out = config.copy_and_resolve_references()
  for key, value in run.overrides.items():
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except TypeError as e:  # ml_collections refuses a value of another type
      raise SweepError(f"get_sweep: config.{key}={value!r}: {e}") from None
  out.wandb.group = sweep_name
  out.wandb.name = run.name
  return out


def _flat_json(config):
  """{dotted field: JSON value} of a ConfigDict or of a config.json dict."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict) and v:
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v

  walk(config, "")
  return out


def config_differences(stored, config):
  """Fields whose value differs between a stored config.json and `config`.

  Fields present in only one of them (the schema changed in between) and
  IGNORED_FIELDS are not compared.
  """
  a, b = _flat_json(stored), _flat_json(config)
  return sorted(k for k in a.keys() & b.keys()
                if not k.startswith(IGNORED_FIELDS) and a[k] != b[k])


def _check_same_config(run_dir, filename, stored, config):
  diff = config_differences(stored, config)
  if diff:
    a, b = _flat_json(stored), _flat_json(config)
    shown = ", ".join(f"{k}: {a[k]!r} there, {b[k]!r} now" for k in diff[:5])
    raise SweepError(
        f"{os.path.join(run_dir, filename)} was written with another config "
        f"({shown}{', ...' if len(diff) > 5 else ''}); use a new --workdir, "
        "or delete that run directory to redo it")


def is_finished(run_dir, config):
  """Whether the run in `run_dir` finished with this config.

  Raises:
    SweepError: the directory holds a finished or started run whose config
      differs from `config`.
  """
  done = os.path.join(run_dir, DONE_FILE)
  if os.path.exists(done):
    with open(done) as f:
      _check_same_config(run_dir, DONE_FILE, json.load(f)["config"], config)
    return True
  started = os.path.join(run_dir, "config.json")
  if os.path.exists(started):
    with open(started) as f:
      _check_same_config(run_dir, "config.json", json.load(f), config)
  return False


def run_sweep(config, grid, workdir, host_index=0, num_hosts=1,
              train_fn=None):
  """Runs (or continues) this host's runs of the grid, one after another.

  Args:
    config: the base config (overrides applied, validated per run by
      train_and_evaluate).
    grid: {dotted field: [values]} (see `expand`).
    workdir: the sweep directory; run k goes to `<workdir>/<name>`.
    host_index: this host's index.
    num_hosts: the number of hosts sharing the sweep.
    train_fn: `(config, workdir) -> summary`; default
      research.train.train_and_evaluate.

  Returns:
    [(Run, status)] for this host's runs, status "trained", "skipped"
    (finished before) or "failed: <reason>" (research.train.TrainingError,
    e.g. diverged; the sweep goes on with the next run).

  Raises:
    SweepError: see `expand`, `host_runs`, `is_finished`.
    research.train.Preempted: a run saved on SIGTERM; rerun to continue.
  """
  from research import train  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  if num_hosts > 1 and jax.process_count() > 1:
    raise SweepError(
        f"jax.distributed is initialised ({jax.process_count()} processes): "
        "every process takes part in each run, so runs cannot be split "
        "between hosts; leave out --host_index/--num_hosts, or start one "
        "independent sweep process per host (no jax.distributed)")
  train_fn = train_fn or train.train_and_evaluate
  runs = expand(grid, config)
  sweep_name = config.wandb.group or os.path.basename(os.path.normpath(workdir))
  mine = host_runs(runs, host_index, num_hosts)
  log.info("sweep %s: %d runs, %d on host %d of %d", sweep_name, len(runs),
           len(mine), host_index, num_hosts)
  results = []
  for run in mine:
    cfg = run_config(config, run, sweep_name)
    run_dir = os.path.join(workdir, run.name)
    if is_finished(run_dir, cfg):
      log.info("run %d/%d %s: finished before, skipped", run.index + 1,
               len(runs), run.name)
      results.append((run, "skipped"))
      continue
    log.info("run %d/%d %s", run.index + 1, len(runs), run.name)
    try:
      summary = train_fn(cfg, run_dir)
    except train.TrainingError as e:
      log.error("run %s failed: %s", run.name, e)
      results.append((run, f"failed: {e}"))
      continue
    if jax.process_index() == 0:
      _write_json(os.path.join(run_dir, DONE_FILE), {
          "config": json.loads(cfg.to_json_best_effort()),
          "summary": summary,
          "finished": datetime.datetime.now().isoformat(timespec="seconds")})
    results.append((run, "trained"))
  return results


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)  # the marker exists whole or not at all


def load_experiment(path):
  """Imports an experiment module from its file path."""
  if not os.path.isfile(path):
    raise SweepError(f"--config {path}: no such file")
  spec = importlib.util.spec_from_file_location("sweep_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def grid_of(config_flag_value):
  """The grid of `--config experiments/x.py[:arg]` from its get_sweep."""
  path, colon, arg = config_flag_value.partition(":")
  module = load_experiment(path)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} defines no get_sweep(arg=None) returning "
                     "{config field: [values]}")
  # As ml_collections calls get_config: with the argument only if given.
  return module.get_sweep(arg) if colon else module.get_sweep()


def check_overrides(grid, overrides, config_file):
  """Refuses a --config.* override of a swept field (which would be lost).

  Args:
    grid: the experiment's get_sweep() result.
    overrides: {dotted field: value} given on the command line.
    config_file: the --config value, for the message.
  """
  swept = sorted(set(grid) & set(overrides))
  if swept:
    raise SweepError(
        f"--config.{swept[0]} is swept by get_sweep in {config_file}; drop "
        "the override (or the field from the grid)")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from research import data, parallelism, train  # pylint: disable=import-outside-toplevel
  from research.configs import ConfigError  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  from research.training.checkpointing import CheckpointError  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "wandb"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  flag = flags.FLAGS["config"]
  workdir = flags.FLAGS.workdir
  try:
    grid = grid_of(flag.config_filename)
    check_overrides(grid, config_flags.get_override_values(flag),
                    flag.config_filename)
    host_index, num_hosts = flags.FLAGS.host_index, flags.FLAGS.num_hosts
    if host_index < 0 and num_hosts < 1:
      # As research.train: a multi-process launch runs each run on all hosts.
      parallelism.initialize_distributed(
          flags.FLAGS.config.parallelism.distributed)
    results = run_sweep(flags.FLAGS.config, grid, workdir,
                        max(host_index, 0), max(num_hosts, 1))
  except train.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except (SweepError, ConfigError, data.DataError, hf.CheckpointError,
          CheckpointError, parallelism.ParallelismError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for run, status in results:
    print(f"{run.name}: {status}")
  print(f"table: python -m research.results --workdir {workdir}")
  if any(status.startswith("failed") for _, status in results):
    sys.exit(1)


def parse_flags(argv):
  """research.train's flags (--config, --config.*, --workdir) and hosts."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from research import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_integer("host_index", -1, "This host's index among "
                       "--num_hosts independent sweep processes.")
  flags.DEFINE_integer("num_hosts", -1, "Independent sweep processes sharing "
                       "the runs (default: one; a multi-process jax.distributed "
                       "launch runs every run on all processes).")
  return cli.parse_flags(argv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)
