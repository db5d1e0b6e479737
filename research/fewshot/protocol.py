"""The few-shot protocol: K-shot splits, one run per split, test at the best.

`run_protocol(config, workdir, k, seeds)` does, for an experiment config
whose training data is a task's full training set and whose evaluation
split(s) its test set:

  1. reads the training set once and writes, per seed, K training and K
     development examples per class (`sampling.sample`, a pure function of
     the seed) as JSON lines under `<workdir>/data/k<K>/seed<S>/`, and the
     test split(s) under `<workdir>/data/test-<name>.jsonl`; the files are
     reused when they exist (the `setfit` baseline reads the same ones);
  2. per seed, trains through `research.train.train_and_evaluate` with
     `config.seed` = the split's seed, the K-shot training file, and the
     development file as the only evaluation split ("dev"): the best
     checkpoint by `config.eval_metric` on it is the model selected;
  3. restores that checkpoint and evaluates it on the test split(s) with the
     run's own evaluators (`train.build` on the test data), writes
     `result.json` (test and dev metrics, wall times) and deletes the
     checkpoints (`keep_checkpoints=False`);
  4. writes `summary.json`: each test metric's mean and standard deviation
     over the splits (numpy's, ddof=0, as LM-BFF reports), the mean wall time
     of a split, and the majority-class share of the test set.

A config that evaluates once, at the end of training (`selects(config)`
is False: SetFit's recipe), has nothing to select: its split trains with
the test split(s) as the evaluation and reports that end-of-training
evaluation, as the full-data reference does. Same model as restoring the
last checkpoint, without a second model load, tokenisation and compile.

`zero_shot=True` skips training: the checkpoint's model as it is on the
test split (a prompt on the masked-LM head). `k=0` is the full-data
reference: the whole training set, one evaluation on the test split at the
end of training, no selection.

A split whose result.json exists is skipped, so rerunning the command
continues an interrupted protocol.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import time

import numpy as np

from research import data, restore, tasks, train
from research.data import splits as splits_lib
from research.fewshot import sampling, table
from research.models import hf

log = logging.getLogger("research.fewshot")

RESULT, SUMMARY = table.RESULT, table.SUMMARY
# An evaluation interval that no run reaches: evaluate once, at the end.
ONCE = 1 << 30


def _raw(source, config, task, labelled):
  cols = task.columns()
  return source.read(bad_rows=config.data.bad_rows, require_labels=labelled,
                     **cols)


def dataset_name(config) -> str:
  """A short name of the experiment's data: the training file's folder, or
  the TFDS / Hugging Face name."""
  d = config.data
  if d.source == "local":
    return os.path.basename(os.path.dirname(os.path.abspath(d.train_file)))
  return d.name + (f"/{d.hf_config}" if d.hf_config else "")


def prepare_data(config, workdir, k, seeds):
  """Writes the K-shot splits and the test split(s) as JSON lines.

  Returns:
    {"tests": {split: path}, "splits": {seed: (train, dev or "")},
    "majority": (label, share of the first test split)}.
  """
  tokenizer = data.load_tokenizer(str(hf.resolve(config.model.name)))
  task = tasks.load(config, tokenizer)
  train_src, eval_srcs = splits_lib._sources(config.data, task.source)  # pylint: disable=protected-access
  if train_src is None or not eval_srcs:
    raise data.DataError("the few-shot protocol needs the task's training "
                         "set (config.data.train_file or train_split) and "
                         "its test set (config.data.eval_file or "
                         "eval_splits)")
  fields, label = tuple(config.data.text_fields), config.data.label_field
  root = os.path.join(workdir, "data")
  tests, majority = {}, None
  for name, src in eval_srcs.items():
    path = os.path.join(root, f"test-{name}.jsonl")
    raw = None
    if not os.path.exists(path):
      raw = _raw(src, config, task, labelled=True)
      sampling.write_jsonl(path, raw, range(len(raw.rows)), fields, label)
    tests[name] = path
    if majority is None:
      with open(path, encoding="utf-8") as f:
        majority = sampling.majority(json.loads(l)[label] for l in f)
  out = {}
  pool = None
  for seed in seeds:
    folder = os.path.join(root, f"k{k}", f"seed{seed}")
    train_path = os.path.join(folder, "train.jsonl")
    dev_path = os.path.join(folder, "dev.jsonl") if k > 0 else ""
    if not os.path.exists(train_path):
      pool = pool or _raw(train_src, config, task, labelled=True)
      if k > 0:
        train_rows, dev_rows = sampling.sample(pool.labels, k, seed)
        sampling.write_jsonl(dev_path, pool, dev_rows, fields, label)
      else:
        train_rows = np.arange(len(pool.rows))
      sampling.write_jsonl(train_path, pool, train_rows, fields, label)
    out[seed] = (train_path, dev_path)
  return {"tests": tests, "splits": out, "majority": majority}


def split_config(config, seed, train_file, eval_files):
  """The experiment's config on one split's files (`eval_files`: {name:
  path}); evaluators configured by name keep their options, their split
  becomes the first of `eval_files`."""
  c = copy.deepcopy(config)
  c.seed = seed
  c.data.source = "local"
  c.data.format = "jsonl"
  c.data.train_file = train_file
  c.data.eval_file = ",".join(f"{n}={p}" for n, p in eval_files.items())
  if c.evals:
    first = next(iter(eval_files))
    for name in c.evals:
      c.evals[name].split = first
  return c


def evaluate(config, run_dir=None):
  """The evaluators' metrics of `config`'s evaluation splits, for the
  run's best checkpoint in `run_dir` (None: the model as loaded)."""
  import jax  # pylint: disable=import-outside-toplevel
  run = train.build(config, None)
  params = run.state["params"]
  if run_dir is not None:
    restored = restore.restore_run(run_dir, "best",
                                   tokenizer=run.task.tokenizer)
    params = jax.device_put(restored.params, run.state_sharding["params"])
  out = {}
  for name, evaluator in run.evaluators.items():
    for metric, value in evaluator.run(params, run.frozen).items():
      out[f"{name}/{metric}"] = float(value)
  return out


def selects(config) -> bool:
  """Whether a run's development-set evaluations choose among checkpoints:
  not when it evaluates once, at its end (an evaluation interval of at
  least the run's steps, or per epoch over one epoch)."""
  every, total = config.eval_every_steps, config.total_steps
  if every <= 0:  # once per epoch
    return total > 0 or config.num_epochs > 1
  return every < (total if total > 0 else ONCE)


def run_split(config, seed, train_file, dev_file, tests, out_dir, *,
              zero_shot=False, keep_checkpoints=False):
  """One split: train (unless zero-shot), select on dev (when the config
  `selects`), test; result.json."""
  run_dir = os.path.join(out_dir, "run")
  # One test split is "test" (metrics "test/<metric>"); several keep names.
  tests = {"test": next(iter(tests.values()))} if len(tests) == 1 else tests
  start, cpu = time.perf_counter(), time.process_time()
  if dev_file and not selects(config):
    dev_file = ""  # nothing to select: one evaluation, on the test split
  result = {"seed": seed, "train_file": train_file, "dev_file": dev_file}
  if zero_shot:
    summary = {}
  elif dev_file:
    summary = train.train_and_evaluate(
        split_config(config, seed, train_file, {"dev": dev_file}), run_dir)
  else:  # full data, or no selection: one evaluation on the test split
    c = split_config(config, seed, train_file, tests)
    c.eval_every_steps = ONCE
    c.keep_checkpoints = 1
    summary = train.train_and_evaluate(c, run_dir)
  trained = time.perf_counter()
  if dev_file or zero_shot:
    test = evaluate(split_config(config, seed, train_file, tests),
                    None if zero_shot else run_dir)
  else:
    test = {}
    for key, value in summary.items():
      if key.startswith("eval/") and isinstance(value, float):
        rest = key[len("eval/"):]
        test[rest if len(tests) > 1 else f"test/{rest}"] = value
  done = time.perf_counter()
  result.update(
      test=test, best_step=summary.get("best_step"),
      final_step=summary.get("final_step"),
      dev={k: v for k, v in summary.items()
           if dev_file and k.startswith("best/")},
      train_s=trained - start, test_s=done - trained, wall_s=done - start,
      # CPU seconds of this process (all threads): on a shared machine the
      # wall time depends on the other jobs, this much less.
      cpu_s=time.process_time() - cpu,
      host=platform.node(), cpus=os.cpu_count(),
      date=time.strftime("%Y-%m-%d"))
  if not keep_checkpoints:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  with open(os.path.join(out_dir, RESULT), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  return result


def run_protocol(config, workdir, k=16, seeds=sampling.SEEDS, *,
                 zero_shot=False, label="", keep_checkpoints=False):
  """Every split of the protocol (see the module docstring); summary.json.

  Returns:
    The summary dict.
  """
  os.makedirs(workdir, exist_ok=True)
  prepared = prepare_data(config, workdir, k, seeds)
  results = []
  for seed in seeds:
    out_dir = os.path.join(workdir, f"k{k}", f"seed{seed}")
    path = os.path.join(out_dir, RESULT)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        results.append(json.load(f))
      log.info("split seed %d: done before (%s)", seed, path)
      continue
    os.makedirs(out_dir, exist_ok=True)
    train_file, dev_file = prepared["splits"][seed]
    result = run_split(config, seed, train_file, dev_file, prepared["tests"],
                       out_dir, zero_shot=zero_shot,
                       keep_checkpoints=keep_checkpoints)
    log.info("split seed %d: test %s, %.1f s", seed, result["test"],
             result["wall_s"])
    results.append(result)
  summary = table.summarize(results, prepared["majority"], k=k, label=label,
                      zero_shot=zero_shot, dataset=dataset_name(config),
                      model=config.model.name, task=config.task)
  with open(os.path.join(workdir, f"k{k}", SUMMARY), "w",
            encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary
