r"""The compression table: dev metric, parameters, size, CPU latency, speed-up.

    # train what is missing (one run at a time), then print the table
    nice -n 15 python benchmarks/compression.py --runs /tmp/compression \
        --data quickstart,mr --seeds 0,1,2 --train
    # the table of the runs there (rows whose runs are missing are skipped)
    python benchmarks/compression.py --runs /tmp/compression --data mr

Runs live at `<runs>/<data>/<run>/<seed>`, one `research.train` run of
`experiments/compression.py` each (run: plain, qat, magnitude0.5, ...).
Every row's model is the run's Hugging Face export loaded back and
compressed after training (`research.compress.compress`):

  fp32                the plain fine-tuned model (the teacher)
  int8 PTQ            plain, int8 weights and activations (qwix)
  int8 weights        plain, int8 weights only
  QAT -> int8         the QAT run's weights, int8 PTQ (what QAT serves)
  magnitude / movement 50%, 90%   the pruning runs (sparse fp32 kernels)
  heads -50%          plain, half the attention heads removed by importance
  heads -50% + int8   the same, then int8 PTQ (composition)
  student (3 layers)  the MiniLM's layers 2, 4, 6 (DistilBERT's one in two,
                      `research.methods.distillation.student`, made once
                      under <runs>/student_l3) fine-tuned alone
  distilled student   the same student taught by the seed's fp32 run
                      (`experiments/distill.py` role=distill: soft targets
                      at T = 2 plus half the hard loss, teacher logits cached)
  distilled + TinyBERT losses  the same plus intermediate losses, weight 1 each: the
                      hidden states (TinyBERT's MSE, student layers 0-3 to
                      teacher layers 0, 2, 4, 6) and the last layer's
                      attention distributions (MiniLM's KL)

Columns: the dev metric (mean ± std over seeds, the run's own evaluators),
non-zero parameters, size on disk of the model's state as safetensors (MB,
10^6 bytes), CPU latency p50 of one forward pass at batch 1 and 32 (dev
sentences padded to the recipe's max length; jitted, compiled first) of the
first seed's model, examples/s at batch 32, and the speed-up against fp32;
then the CPU time of a batch-32 pass (all of XLA's threads) and the speed-up
by it, the measure that a host shared with other jobs disturbs least (the
wall time includes waiting for a core). Latencies alternate between the rows
in every round, so that a busy host slows them alike; the load average is
printed with the table. Per-run scores are cached in `<run>/compression/`.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)

# name -> (run directory, compress() options).
ROWS = {
    "fp32": ("plain", {}),
    "int8 PTQ": ("plain", {"quantize": "int8"}),
    "int8 weights": ("plain", {"quantize": "int8_weights"}),
    "QAT -> int8": ("qat", {"quantize": "int8"}),
    "magnitude 50%": ("magnitude0.5", {}),
    "magnitude 90%": ("magnitude0.9", {}),
    "movement 50%": ("movement0.5", {}),
    "movement 90%": ("movement0.9", {}),
    "heads -50%": ("plain", {"prune_heads": 0.5}),
    "heads -50% + int8": ("plain", {"prune_heads": 0.5, "quantize": "int8"}),
    "student (3 layers)": ("student", {}),
    "distilled student": ("distill", {}),
    "distilled + TinyBERT losses": ("distill_tinybert", {}),
}
# The distillation runs' experiments/distill.py settings.
DISTILL_RUNS = {"student": "role=student", "distill": "role=distill",
                "distill_tinybert": "role=distill,hidden=1.0,attention=1.0,"
                                    "logits=fly"}
STUDENT_LAYERS = "2,4,6"


# --data_dir's default: the copies beside the repository on this project's
# machines. A fresh clone has none: RTE and CoLA then come from TFDS, MR
# (no TFDS copy) needs --data_dir.
SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "..", "..", "shared", "data"))
FOLDERS = {"mr": "senteval_mr", "rte": "glue_rte", "cola": "glue_cola"}
DATASETS = ("quickstart",) + tuple(FOLDERS)


def run_config(runs_dir, data, run, seed, data_dir=SHARED) -> str:
  """The `--config` of a run directory name: `experiments/compression.py`'s
  runs, or `experiments/distill.py`'s for the student rows; the local TSVs of
  `data` under `data_dir` where they are, else its default download."""
  folder = os.path.join(data_dir, FOLDERS.get(data, ""))
  local = (f",data_dir={folder}" if data in FOLDERS and os.path.isdir(folder)
           else "")
  if run in DISTILL_RUNS:
    student = os.path.join(runs_dir, "student_l3")
    teacher = os.path.join(runs_dir, data, "plain", str(seed))
    return (f"experiments/distill.py:data={data},{DISTILL_RUNS[run]},"
            f"student={student},teacher={teacher},seed={seed}{local}")
  if run in ("plain", "qat"):
    return f"experiments/compression.py:data={data},method={run},seed={seed}{local}"
  method = run.rstrip("0123456789.")
  return (f"experiments/compression.py:data={data},method={method},"
          f"sparsity={run[len(method):]},seed={seed}{local}")


def finished(workdir) -> bool:
  return os.path.exists(os.path.join(workdir, "summary.json"))


def train_missing(runs_dir, datasets, seeds, rows, nice, data_dir=SHARED):
  """Runs each missing `research.train` run, one at a time, seed by seed
  (every row of seed 0 first), at niceness `nice` (counting this process's)."""
  nice = max(0, nice - os.nice(0))
  student = os.path.join(runs_dir, "student_l3")
  if any(ROWS[r][0] in DISTILL_RUNS for r in rows) and not (
      os.path.exists(os.path.join(student, "config.json"))):
    subprocess.check_call(
        [sys.executable, "-m", "research.methods.distillation.student",
         "--teacher", "all-minilm-l6-v2", "--layers", STUDENT_LAYERS,
         "--out", student], cwd=ROOT)
  for data in datasets:
    for seed in seeds:
      runs = [ROWS[r][0] for r in rows]
      if any(run.startswith("distill") for run in runs):
        runs.insert(0, "plain")  # the students' teacher: the seed's fp32 run
      for run in dict.fromkeys(runs):
        workdir = os.path.join(runs_dir, data, run, str(seed))
        if finished(workdir):
          continue
        cmd = ["nice", "-n", str(nice), sys.executable, "-m", "research.train",
               "--config", run_config(runs_dir, data, run, seed, data_dir),
               "--workdir", workdir]
        os.makedirs(workdir, exist_ok=True)
        print("training:", " ".join(cmd[3:]), flush=True)
        t0 = time.time()
        with open(os.path.join(workdir, "train.log"), "a") as log:
          status = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=log)
        print(f"  exit {status} after {time.time() - t0:.0f} s", flush=True)


def score(workdir, name, options):
  """The compressed model's report (cached in <workdir>/compression/)."""
  from research import compress  # pylint: disable=import-outside-toplevel
  cache = os.path.join(workdir, "compression", name.replace(" ", "_")
                       .replace("%", "pct").replace(">", "") + ".json")
  if os.path.exists(cache):
    with open(cache) as f:
      return json.load(f), None
  compressed = compress.compress(workdir, **options)
  result = compress.report(compressed)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  with open(cache, "w") as f:
    json.dump(result, f, indent=2)
  return result, compressed


def latency_fns(compressed, batch_sizes):
  """{batch size: (jitted forward, args)} of a compressed model on dev rows."""
  import jax  # pylint: disable=import-outside-toplevel
  from research import data as data_lib  # pylint: disable=import-outside-toplevel
  from research.training import partition  # pylint: disable=import-outside-toplevel
  restored = compressed.as_restored()
  task, config = restored.task, restored.config
  split = next(iter(compressed.splits.values()))
  length = config.data.max_length
  graphdef = restored.graphdef

  @jax.jit
  def forward(params, frozen, batch):
    return task.forward(partition.merge(graphdef, params, frozen), batch)

  out = {}
  for b in batch_sizes:
    batch = data_lib.Batcher(split, b, (length,), shuffle=False).batch_at(0)
    batch = {k: v for k, v in batch.items()
             if k in ("input_ids", "attention_mask", "token_type_ids")}
    args = (restored.params, restored.frozen, batch)
    jax.block_until_ready(forward(*args))  # compile
    out[b] = (forward, args)
  return out


def time_rows(fns, rounds, batch_sizes):
  """{row: {batch: p50 wall seconds}}, {row: {batch: p50 CPU seconds}}.

  The rows alternate in every round. CPU time (`time.process_time`, all of
  XLA's threads) is the work of a pass: on a host shared with other jobs it
  moves far less than the wall time, which includes waiting for a core.
  """
  import jax  # pylint: disable=import-outside-toplevel
  wall = {row: {b: [] for b in batch_sizes} for row in fns}
  cpu = {row: {b: [] for b in batch_sizes} for row in fns}
  for b in batch_sizes:
    # Batch 1 is ~30x quicker than 32: more rounds for the same time.
    n = rounds * (5 if b == 1 else 1)
    for _ in range(n):
      for row, by_batch in fns.items():
        fn, args = by_batch[b]
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall[row][b].append(time.perf_counter() - t)
        cpu[row][b].append(time.process_time() - c)
  p50 = lambda d: {row: {b: float(np.median(v)) for b, v in t.items()}  # pylint: disable=unnecessary-lambda-assignment
                   for row, t in d.items()}
  return p50(wall), p50(cpu)


def mean_std(values):
  if not values:
    return "not run"
  if len(values) == 1:
    return f"{values[0]:.3f} (1 seed)"
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def majority(workdir) -> float:
  """Dev accuracy of the majority class (from the dev split's labels)."""
  # pylint: disable=import-outside-toplevel
  from research import compress, data as data_lib, restore, tasks
  from research.models import hf
  config = restore.read_config(workdir)
  tokenizer = data_lib.load_tokenizer(str(hf.resolve(config.model.name)))
  _, splits = compress.load_splits(workdir, config,
                                   tasks.load(config, tokenizer), tokenizer)
  labels = np.asarray(next(iter(splits.values())).arrays["labels"])
  return float(np.bincount(labels).max() / len(labels))


def table(runs_dir, data, seeds, rows, rounds):
  """Scores every row's runs, times the first seed's models, prints the table."""
  results, timed = {}, {}
  metric_key = None
  for row in rows:
    run, options = ROWS[row]
    per_seed = []
    for seed in seeds:
      workdir = os.path.join(runs_dir, data, run, str(seed))
      if not finished(workdir):
        continue
      result, compressed = score(workdir, row, options)
      if metric_key is None:  # the run's eval_metric
        from research import restore  # pylint: disable=import-outside-toplevel
        wanted = "/" + restore.read_config(workdir).eval_metric
        metric_key = next(k for k in result["metrics"] if k.endswith(wanted))
      per_seed.append((seed, result))
      if seed == seeds[0]:
        if compressed is None:
          from research import compress  # pylint: disable=import-outside-toplevel
          compressed = compress.compress(workdir, **options)
        timed[row] = compressed
      print(f"{data} {row} seed {seed}: "
            f"{json.dumps(result['metrics'])}", flush=True)
    results[row] = per_seed
  fns = {row: latency_fns(c, (1, 32)) for row, c in timed.items()}
  latency, cpu = time_rows(fns, rounds, (1, 32)) if fns else ({}, {})
  load = os.getloadavg()[0]
  first = os.path.join(runs_dir, data, "plain", str(seeds[0]))
  lines = [f"### {data}", "",
           f"| model | dev {metric_key.split('/')[-1] if metric_key else ''} "
           "(mean ± std) | seeds | parameters (non-zero) | MB | p50 ms, batch 1 "
           "| p50 ms, batch 32 | examples/s (32) | speed-up (1 / 32) "
           "| CPU ms, batch 32 | speed-up, CPU time (32) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  if finished(first):
    lines.append(f"| majority class | {majority(first):.3f} (accuracy) "
                 "| | | | | | | | | |")
  base, base_cpu = latency.get("fp32"), cpu.get("fp32")
  summary = {}
  for row in rows:
    per_seed = results[row]
    values = [r["metrics"][metric_key] for _, r in per_seed] if per_seed else []
    lat = latency.get(row)
    params = per_seed[0][1]["parameters_nonzero"] if per_seed else None
    size = per_seed[0][1]["size_bytes"] / 1e6 if per_seed else None
    cells = [row, mean_std(values), str([s for s, _ in per_seed]),
             f"{params:,}" if params else "", f"{size:.1f}" if size else ""]
    if lat:
      cells += [f"{1e3 * lat[1]:.1f}", f"{1e3 * lat[32]:.1f}",
                f"{32 / lat[32]:.1f}"]
      cells.append(f"{base[1] / lat[1]:.2f}x / {base[32] / lat[32]:.2f}x"
                   if base else "")
      cells.append(f"{1e3 * cpu[row][32]:.1f}")
      cells.append(f"{base_cpu[32] / cpu[row][32]:.2f}x" if base_cpu else "")
    else:
      cells += [""] * 6
    lines.append("| " + " | ".join(cells) + " |")
    summary[row] = {"values": values, "seeds": [s for s, _ in per_seed],
                    "parameters_nonzero": params, "mb": size,
                    "latency_s": lat, "cpu_s": cpu.get(row),
                    "load_average": load,
                    "sparsity": (per_seed[0][1].get("sparsity") if per_seed
                                 else None),
                    "pruned_heads": (per_seed[0][1].get("pruned_heads")
                                     if per_seed else None)}
  lines.append(f"\n(1-minute load average after timing: {load:.1f})")
  print("\n".join(lines), flush=True)
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", required=True, help="The runs' root folder.")
  parser.add_argument("--data", default="quickstart",
                      help="Comma-separated: quickstart, mr, rte, cola.")
  parser.add_argument("--data_dir", default=SHARED,
                      help="Holds senteval_mr/, glue_rte/, glue_cola/ with "
                      "train.tsv and dev.tsv (default: %(default)s); RTE and "
                      "CoLA without it come from TFDS.")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--rows", default=",".join(ROWS),
                      help="Comma-separated row names (default: all).")
  parser.add_argument("--train", action="store_true",
                      help="First train the missing runs, one at a time.")
  parser.add_argument("--no_table", action="store_true",
                      help="With --train: only train.")
  parser.add_argument("--nice", type=int, default=15)
  parser.add_argument("--rounds", type=int, default=10,
                      help="Timed forward passes per row at batch 32 (x5 at 1).")
  parser.add_argument("--out", default="", help="Also write the results as JSON.")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  datasets = args.data.split(",")
  rows = args.rows.split(",")
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"--rows: unknown {unknown}; valid: {', '.join(ROWS)}")
  unknown = [d for d in datasets if d not in DATASETS]
  if unknown:
    parser.error(f"--data: unknown {unknown}; valid: {', '.join(DATASETS)}")
  mr = os.path.join(args.data_dir, FOLDERS["mr"])
  if "mr" in datasets and not os.path.isdir(mr):
    parser.error(f"--data mr reads {mr} (SentEval MR has no TFDS copy), "
                 "which is absent: pass --data_dir")
  out = {}
  for data in datasets:
    if args.train:
      train_missing(args.runs, [data], seeds, rows, args.nice, args.data_dir)
    if not args.no_table:
      out[data] = table(args.runs, data, seeds, rows, args.rounds)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
