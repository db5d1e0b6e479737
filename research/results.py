"""Prints the GLUE table of a sweep (or of several) beside published numbers.

    python -m research.results --workdir /tmp/glue/sst2
    python -m research.results --workdir /tmp/glue --csv /tmp/glue.csv
    python -m research.results --workdir /tmp/glue/rte --at=final

Reads every run under --workdir (a directory with config.json and
summary.json; runs of one task in one directory are one sweep) and prints, in
Markdown, per task and metric: the best run by the dev metric that selected
checkpoints, and the mean ± std over seeds at the best hyper-parameters,
beside Hugging Face's bert-base-cased dev numbers and the BERT paper's test
numbers (research/references/, read by research/glue.py).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import sys

import numpy as np

from research import glue


# --- Runs of a sweep ----------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  """One finished run, as the results table sees it.

  Attributes:
    path: its directory relative to the scanned one ("lr=5e-05,seed=0").
    task: its GLUE task, else the name of the directory holding it.
    group: its parent directory relative to the scanned one ("" = that one):
      runs of one task and one parent make one sweep.
    config: config.json flattened to {dotted field: value}.
    metrics: {metric key: value} of the dev evaluation reported (keys
      "accuracy", or "matched/accuracy" with several eval splits).
    selection: the metric key that selected the best checkpoint.
    mode: "max" or "min" for `selection`.
    step: the step of the evaluation reported.
  """
  path: str
  task: str
  group: str
  config: dict
  metrics: dict
  selection: str
  mode: str
  step: int


def metric_key(logged):
  """"eval/accuracy" -> "accuracy"; "eval/validation_matched/f1" -> "matched/f1".

  The eval split's "validation_" prefix is dropped: the keys name metrics of
  dev sets whatever the source calls them.
  """
  parts = logged.split("/")[1:]
  if len(parts) == 2:
    parts[0] = parts[0].removeprefix("validation_")
  return "/".join(parts)


def _flatten(node, prefix=""):
  out = {}
  for k, v in node.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _read_jsonl(path):
  rows = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(l) for l in f if l.strip()]
  return rows


_SKIP_DIRS = {"checkpoints", "best", "cache", "wandb"}


def find_runs(directory):
  """Run directories (holding config.json) under `directory`, sorted.

  Returns:
    (finished, unfinished): relative paths; finished runs have summary.json.
  """
  finished, unfinished = [], []
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    if "config.json" in files:
      rel = os.path.relpath(root, directory)
      (finished if "summary.json" in files else unfinished).append(
          "" if rel == "." else rel)
      dirs[:] = []  # A run holds no runs.
  return finished, unfinished


def read_run(directory, rel, at="best"):
  """Reads one finished run.

  Args:
    directory: the scanned directory.
    rel: the run's path relative to it.
    at: "best": the metrics of the evaluation that made the best checkpoint
      (the one research.predict uses); "final": those of the last one.

  Returns:
    A `RunResult`, or None when the run logged no evaluation.
  """
  run_dir = os.path.join(directory, rel)
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  best_key = next((k[len("best/"):] for k in summary if k.startswith("best/")),
                  None)
  if best_key is None:
    return None
  evals = {k: v for k, v in summary.items() if k.startswith("eval/")}
  step = summary.get("final_step")
  if at == "best" and summary.get("best_step") is not None:
    step = summary["best_step"]
    rows = [r for r in _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            if r.get("step") == step and any(k.startswith("eval/") for k in r)]
    if rows:  # The last one: a resumed run may have logged the step twice.
      evals = {k: v for k, v in rows[-1].items() if k.startswith("eval/")}
  if not evals:
    return None
  metrics = {metric_key(k): float(v) for k, v in evals.items()
             if isinstance(v, (int, float))}
  selection = metric_key(best_key)
  keep = set(config.get("metrics", [])) | {best_key.rsplit("/", 1)[-1]}
  metrics = {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] in keep}
  parent = os.path.dirname(rel)
  task = glue.task_of(config) or os.path.basename(
      os.path.normpath(os.path.join(directory, parent)))
  return RunResult(path=rel or ".", task=task, group=parent,
                   config=_flatten(config), metrics=metrics,
                   selection=selection,
                   mode=config.get("eval_metric_mode", "max"), step=step)


def collect(directory, at="best"):
  """Reads every finished run under `directory`.

  Returns:
    (runs, unfinished): a list of `RunResult`, and the relative paths of
    runs without summary.json (still running, interrupted or failed).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such directory")
  finished, unfinished = find_runs(directory)
  runs = [r for r in (read_run(directory, rel, at) for rel in finished) if r]
  return runs, unfinished


# --- The table ----------------------------------------------------------------

# Fields that differ between runs of a sweep without being hyper-parameters.
_NOT_HPARAMS = ("wandb.", "data.cache_dir")


def _varying(runs):
  """The config fields (sorted) whose values differ between the runs."""
  keys = set().union(*(r.config for r in runs))
  return [k for k in sorted(keys) if not k.startswith(_NOT_HPARAMS) and
          len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def _hparams_label(values):
  from research.sweep import format_overrides  # pylint: disable=import-outside-toplevel
  return format_overrides(values) or "(one setting)"


def _better(a, b, mode):
  return a > b if mode == "max" else a < b


def summarize(runs, references=None):
  """The rows of the results table: one per (sweep, metric).

  Runs of one task in one directory are one sweep. Its best run is the one
  with the best selection metric. Its hyper-parameter groups are the runs
  that share every varying config field but the seed; the best group has the
  best mean selection metric, and its mean and standard deviation (sample,
  n - 1) over seeds are reported for every metric.

  Args:
    runs: `RunResult`s (see `collect`).
    references: `glue.load_references()` output; None loads the shipped ones.

  Returns:
    A list of dicts (keys as `COLUMNS`), x100 values, in GLUE task order.
  """
  references = glue.load_references() if references is None else references
  sweeps = collections.defaultdict(list)
  for r in runs:
    sweeps[(r.task, r.group)].append(r)
  names = collections.Counter(task for task, _ in sweeps)
  order = {t: i for i, t in enumerate(glue.TASKS)}
  rows = []
  for (task, group), members in sorted(
      sweeps.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0])):
    selection, mode = members[0].selection, members[0].mode
    members = [m for m in members if selection in m.metrics]
    if not members:
      continue
    best = members[0]
    for m in members[1:]:
      if _better(m.metrics[selection], best.metrics[selection], mode):
        best = m
    varying = _varying(members)
    hparams = [k for k in varying if k != "seed"]
    groups = collections.defaultdict(list)
    for m in members:
      groups[tuple(json.dumps(m.config.get(k)) for k in hparams)].append(m)
    best_group = None
    for key, ms in groups.items():
      mean = float(np.mean([m.metrics[selection] for m in ms]))
      if best_group is None or _better(mean, best_group[0], mode):
        best_group = (mean, key, ms)
    _, key, group_runs = best_group
    label = _hparams_label({k: json.loads(v) for k, v in zip(hparams, key)})
    for metric in best.metrics:
      values = [m.metrics[metric] * 100 for m in group_runs
                if metric in m.metrics]
      hf = references["hf_dev"].get((task, metric), {})
      rows.append({
          "task": task if names[task] == 1 else f"{task} ({group or '.'})",
          "metric": metric,
          "selects": metric == selection,
          "split": "dev",
          "runs": len(members),
          "best_run": best.path,
          "best": best.metrics[metric] * 100,
          "best_hparams": label,
          "mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
          "n": len(values),
          "hf_dev_mean": hf.get("flax_mean"),
          "hf_dev_std": hf.get("flax_stdev"),
          "hf_dev_best": hf.get("flax_best"),
          "hf_dev_pytorch": hf.get("pytorch"),
          "paper_test_base": references["paper_test"].get(
              ("BERT-BASE", task, metric)),
          "paper_test_large": references["paper_test"].get(
              ("BERT-LARGE", task, metric)),
      })
  return rows


COLUMNS = ("task", "metric", "selects", "split", "runs", "best_run", "best",
           "best_hparams", "mean", "std", "n", "hf_dev_mean", "hf_dev_std",
           "hf_dev_best", "hf_dev_pytorch", "paper_test_base",
           "paper_test_large")


def _fmt(value, digits=2):
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return f"{value:.{digits}f}"


def _mean_std(mean, std, n=None):
  if mean is None:
    return "–"
  text = _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std)}"
  return text if n is None else f"{text} (n={n})"


def _hf_dev(row):
  if row["hf_dev_mean"] is None and row["hf_dev_pytorch"] is not None:
    return f"{_fmt(row['hf_dev_pytorch'])} (PyTorch, 1 run)"
  return _mean_std(row["hf_dev_mean"], row["hf_dev_std"])


def markdown(rows, title, at="best", unfinished=()):
  """The table as Markdown, saying which numbers are dev and which test."""
  where = ("at its best checkpoint (the evaluation that selected it; "
           "research.predict uses it)" if at == "best"
           else "at its last evaluation")
  lines = [
      f"## GLUE results: {title}", "",
      f"Ours: **dev** sets, each run's metrics {where}, x100. *best*: the run "
      "with the best selection metric (marked \\*); *mean ± std*: over the "
      "seeds of the hyper-parameters with the best mean (sample std, n runs).",
      "References: Hugging Face bert-base-cased on the **dev** sets (Flax "
      "example, mean ± stdev of 5 seeds; "
      f"research/references/{glue.HF_DEV_CSV}); BERT paper Table 1 on "
      "the **test** sets (GLUE server; "
      f"research/references/{glue.PAPER_TEST_CSV}): test is other data "
      "than dev, so compare ours with the dev reference.", "",
      "| task | metric | runs | best run | best (dev) | best hyper-parameters "
      "| mean ± std (dev) | HF bert-base-cased (dev) | BERT-BASE paper (test) "
      "| BERT-LARGE paper (test) |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    star = " \\*" if r["selects"] else ""
    lines.append(
        f"| {r['task']} | {r['metric']}{star} "
        f"| {r['runs']} | {r['best_run']} | {_fmt(r['best'])} "
        f"| {r['best_hparams']} | {_mean_std(r['mean'], r['std'], r['n'])} "
        f"| {_hf_dev(r)} "
        f"| {_fmt(r['paper_test_base'], 1)} "
        f"| {_fmt(r['paper_test_large'], 1)} |")
  if not rows:
    lines.append("| (no finished runs) | | | | | | | | | |")
  if unfinished:
    lines += ["", f"Not finished (no summary.json): {', '.join(unfinished)}"]
  return "\n".join(lines) + "\n"


def write_csv(rows, path):
  """Writes the rows (all COLUMNS, full precision, x100) to `path`."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})

def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "A sweep directory (or a parent of "
                      "several).")
  flags.DEFINE_string("csv", None, "Also write the rows (all columns) here.")
  flags.DEFINE_enum("at", "best", ["best", "final"], "Each run's metrics at "
                    "its best checkpoint or at its last evaluation.")
  flags.mark_flags_as_required(["workdir"])

  def run(argv):
    del argv
    try:
      runs, unfinished = collect(flags.FLAGS.workdir, flags.FLAGS.at)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    rows = summarize(runs)
    print(markdown(rows, flags.FLAGS.workdir, flags.FLAGS.at, unfinished))
    if flags.FLAGS.csv:
      write_csv(rows, flags.FLAGS.csv)
      print(f"wrote {flags.FLAGS.csv}")

  app.run(run)


if __name__ == "__main__":
  main()
