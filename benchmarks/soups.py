r"""Model soups vs logit ensembles vs single runs: RTE, CoLA, MR on MiniLM.

    # trains what is missing (resumable: a rerun skips finished runs and
    # resumes an interrupted one), then prints one table per task
    nice -n 15 python benchmarks/soups.py --root /tmp/soups \
        --tasks rte,cola,mr --seeds 0,1,2,3,4
    # smoke check: 2 seeds, a few steps
    python benchmarks/soups.py --root /tmp/soups_smoke --tasks rte \
        --seeds 0,1 --total_steps 8

Each run is `experiments/_glue_minilm.get_config(task, data_dir=
<--data_dir>/<folder>)` (batch 32, lr 1e-4, 3 epochs; --data_dir holds
glue_rte/, glue_cola/, senteval_mr/ with train.tsv and dev.tsv, by default
../shared/data, which a fresh clone lacks) with `config.model.init_seed=0`
(one head initialisation for every run, as Wortsman et al. 2022 fine-tune
their soups' ingredients) and
`config.seed=s` (data order and dropout). The task's dev file is split in
two halves by line: the first (`<root>/<task>/data/select.tsv`) is each
run's evaluation split (its best checkpoint is chosen there) and the greedy
soup's held-out set; the second (`report.tsv`) is what the table reports,
seen by nothing before. Rows (`research.soup.compare`): best single run,
mean ± std over the runs, the logit ensemble of all runs, the uniform soup
of all runs, the greedy soup (its members listed). Metric: the recipe's
eval_metric (MCC on CoLA, accuracy on RTE and MR).
"""

import argparse
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)

# Default: the copies beside the repository on this project's machines
# (../shared/data; a fresh clone has none: pass --data_dir).
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
FOLDERS = {"rte": "glue_rte", "cola": "glue_cola", "mr": "senteval_mr"}


def split_dev(dev_file, out_dir):
  """(select, report): the dev file's first and second half of its rows,
  each with the header, written once under `out_dir`."""
  select = os.path.join(out_dir, "select.tsv")
  report = os.path.join(out_dir, "report.tsv")
  if os.path.exists(select) and os.path.exists(report):
    return select, report
  with open(dev_file, encoding="utf-8") as f:
    header, *rows = f.read().splitlines(keepends=True)
  columns = header.count("\t")
  bad = [i + 2 for i, r in enumerate(rows) if r.count("\t") != columns]
  if bad:  # a quoted field spanning lines would be cut in two
    raise ValueError(f"{dev_file}: lines {bad[:5]} have another number of "
                     "columns than the header; cannot split by line")
  half = len(rows) // 2
  os.makedirs(out_dir, exist_ok=True)
  for path, part in ((select, rows[:half]), (report, rows[half:])):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(header + "".join(part))
    os.replace(tmp, path)
  return select, report


def run_config(task, seed, select_file, epochs, total_steps, data_dir):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import _glue_minilm  # pylint: disable=import-outside-toplevel,import-error
  config = _glue_minilm.get_config(
      task, data_dir=os.path.join(data_dir, FOLDERS[task]))
  config.model.init_seed = 0
  config.seed = seed
  config.num_epochs = float(epochs)
  if total_steps:
    config.total_steps = total_steps
    config.eval_every_steps = total_steps
  config.data.eval_file = select_file  # checkpoints chosen on this half
  config.wandb.mode = "disabled"
  return config


def train_missing(root, task, seeds, select_file, epochs, total_steps,
                  data_dir):
  """Each seed's run, unless finished (summary.json); an interrupted one
  resumes from its checkpoint."""
  from research import cli  # pylint: disable=import-outside-toplevel
  workdirs = []
  for seed in seeds:
    workdir = os.path.join(root, task, f"seed{seed}")
    workdirs.append(workdir)
    if os.path.exists(os.path.join(workdir, "summary.json")):
      continue
    print(f"training {task} seed {seed} -> {workdir}", flush=True)
    t0 = time.time()
    status = cli.run(run_config(task, seed, select_file, epochs, total_steps,
                                data_dir), workdir)
    if status != 0:
      raise SystemExit(f"{workdir}: research.train exited {status}")
    print(f"  {time.time() - t0:.0f} s", flush=True)
  return workdirs


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--root", required=True, help="Where the runs live.")
  p.add_argument("--data_dir", default=SHARED,
                 help="Holds " + ", ".join(f"{f}/" for f in FOLDERS.values())
                 + " with train.tsv and dev.tsv (default: %(default)s).")
  p.add_argument("--tasks", default="rte,cola,mr")
  p.add_argument("--seeds", default="0,1,2,3,4")
  p.add_argument("--epochs", type=float, default=3.0)
  p.add_argument("--total_steps", type=int, default=0,
                 help="> 0: train this many steps instead (smoke checks).")
  p.add_argument("--which", default="best", choices=("best", "latest"),
                 help="Which checkpoint of each run is an ingredient.")
  p.add_argument("--batch_size", type=int, default=64)
  args = p.parse_args()
  tasks = [t for t in args.tasks.split(",") if t]
  unknown = sorted(set(tasks) - set(FOLDERS))
  if unknown:
    p.error(f"--tasks: unknown {unknown}; valid: {', '.join(FOLDERS)}")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  missing = [os.path.join(args.data_dir, FOLDERS[t], f) for t in tasks
             for f in ("train.tsv", "dev.tsv")
             if not os.path.exists(os.path.join(args.data_dir, FOLDERS[t], f))]
  if missing:
    p.error(f"--data_dir {args.data_dir}: missing {', '.join(missing)}")

  import jax  # pylint: disable=import-outside-toplevel
  from research import soup  # pylint: disable=import-outside-toplevel
  from research.data import splits  # pylint: disable=import-outside-toplevel
  print(f"command: python benchmarks/soups.py {' '.join(sys.argv[1:])}")
  print(f"date: {datetime.date.today()}; hardware: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; seeds {seeds} (config.seed), "
        "init_seed 0; checkpoints: " + args.which +
        (f"; {args.total_steps} steps" if args.total_steps
         else f"; {args.epochs:g} epochs"))
  for task in tasks:
    dev = os.path.join(args.data_dir, FOLDERS[task], "dev.tsv")
    select, report = split_dev(dev, os.path.join(args.root, task, "data"))
    workdirs = train_missing(args.root, task, seeds, select, args.epochs,
                             args.total_steps, args.data_dir)
    runs = soup.load_runs(workdirs, args.which)
    first = runs[0]
    loaded = [splits.load_file(first.config, first.tokenizer, first.task,
                               path, name, first.label_names)
              for path, name in ((select, "select"), (report, "report"))]
    result = soup.compare(runs, *loaded, batch_size=args.batch_size)
    print(f"\n### {task}: {result['metric']} on the second half of {dev} "
          f"({len(loaded[1])} rows); greedy soup chosen on the first half "
          f"({len(loaded[0])} rows)\n")
    print(soup.format_table(result))
    print("\ngreedy trials (run, alone, soup with it, joined): " + "; ".join(
        f"{os.path.basename(w)} {a:.4f} {s:.4f} {'yes' if j else 'no'}"
        for w, a, s, j in result["greedy_trials"]), flush=True)


if __name__ == "__main__":
  main()
