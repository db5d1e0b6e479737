r"""Held-out masked-LM curves of pre-training runs against steps, wall and CPU time.

    nice -n 15 python benchmarks/pretrain_curve.py --out /tmp/curves \
        --run "cramming=experiments/pretrain_wikitext.py:steps=600,batch=16,data_dir=../shared/data/wikitext" \
        --run "bert=experiments/pretrain_wikitext.py:recipe=bert,steps=600,data_dir=../shared/data/wikitext" \
        --budget_minutes 45
    python benchmarks/pretrain_curve.py --out /tmp/curves --plot /tmp/curves/pretrain_curve.png

Runs each `name=config` as a `research.train` process, one after the other
(workdir `<out>/<name>`; a finished run is not rerun), and records every
held-out evaluation it logs with the wall time since the process started,
the process's CPU time (user + system, all threads, from /proc) and the
machine's 1-minute load average: `<out>/<name>/curve.jsonl`. A run is stopped
(SIGTERM: it saves a checkpoint) once its CPU time passes `--budget_minutes`
(or its wall time `--wall_minutes`, when given): on a machine shared with
other jobs, a niced run gets a fraction of the cores, which shows in the
wall-time axis and not in the CPU-time one. `--plot` draws held-out masked-token accuracy and loss
against steps, wall minutes and CPU minutes for every run found in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process (all its threads), from /proc."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def run_one(name, config, out, budget_s, extra, wall_limit_s=0.0):
  """Runs one config, logging each evaluation's times; returns the rows."""
  workdir = os.path.join(out, name)
  curve = os.path.join(workdir, "curve.jsonl")
  if os.path.exists(os.path.join(workdir, "done")):
    print(f"{name}: done before, kept ({curve})")
    return
  os.makedirs(workdir, exist_ok=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  command = [sys.executable, "-m", "research.train", "--config", config,
             "--workdir", workdir, "--config.wandb.mode=disabled", *extra]
  with open(os.path.join(workdir, "command.txt"), "w") as f:
    f.write(" ".join(command) + "\n")
  log = open(os.path.join(workdir, "train.log"), "w")  # pylint: disable=consider-using-with
  start = time.time()
  proc = subprocess.Popen(command, cwd=REPO, stdout=log,  # pylint: disable=consider-using-with
                          stderr=subprocess.STDOUT)
  seen, stopped, cpu = 0, "", 0.0
  with open(curve, "w") as rows:
    while True:
      done = proc.poll() is not None
      if not done:
        try:
          cpu = cpu_seconds(proc.pid)
        except OSError:
          pass
      wall = time.time() - start
      if os.path.exists(metrics):
        with open(metrics) as f:
          lines = f.read().splitlines()
        for line in lines[seen:]:
          row = json.loads(line)
          if "eval/accuracy" in row:
            rows.write(json.dumps({
                "step": row["step"], "accuracy": row["eval/accuracy"],
                "loss": row["eval/loss"], "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 1), "load1": os.getloadavg()[0]}) + "\n")
            rows.flush()
        seen = len(lines)
      if done:
        break
      if not stopped and (cpu > budget_s or 0 < wall_limit_s < wall):
        stopped = f"stopped at {wall / 60:.1f} wall min, {cpu / 60:.1f} CPU min"
        proc.send_signal(signal.SIGTERM)
      time.sleep(2)
  with open(os.path.join(workdir, "done"), "w") as f:
    f.write(f"rc={proc.returncode} {stopped}\n")
  print(f"{name}: rc={proc.returncode} {stopped} -> {curve}")


def plot(out, path, only=(), title="BERT 4x256 from scratch on WikiText-2"):
  """Accuracy and loss against steps, wall and CPU minutes, every run (or
  those named in `only`)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  runs = {}
  for name in (only or sorted(os.listdir(out))):
    curve = os.path.join(out, name, "curve.jsonl")
    if os.path.exists(curve):
      with open(curve) as f:
        runs[name] = [json.loads(l) for l in f if l.strip()]
  fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey="row")
  for name, rows in runs.items():
    for col, (key, scale) in enumerate((("step", 1), ("wall_s", 60),
                                        ("cpu_s", 60))):
      x = [r[key] / scale for r in rows]
      axes[0, col].plot(x, [r["accuracy"] for r in rows], marker=".",
                        label=name)
      axes[1, col].plot(x, [r["loss"] for r in rows], marker=".", label=name)
  for col, label in enumerate(("step", "wall minutes (2 shared CPU cores)",
                               "process CPU minutes")):
    axes[1, col].set_xlabel(label)
    axes[0, col].axhline(0.15, color="grey", lw=0.8, ls="--")
  axes[0, 0].set_ylabel("held-out masked-token accuracy")
  axes[1, 0].set_ylabel("held-out masked-LM loss (nats)")
  axes[0, 0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--run", action="append", default=[],
                      help="name=experiments/x.py[:arg] (repeatable)")
  parser.add_argument("--budget_minutes", type=float, default=45.0,
                      help="stop a run after this much CPU time")
  parser.add_argument("--wall_minutes", type=float, default=0.0,
                      help="> 0: also stop after this much wall time")
  parser.add_argument("--plot", default="", help="write the PNG here")
  parser.add_argument("--only", default="", help="plot these runs (a,b,...)")
  parser.add_argument("--title", default="BERT 4x256 from scratch on "
                      "WikiText-2, held-out masked LM")
  parser.add_argument("--override", action="append", default=[],
                      help="--config.* flags for every run")
  args = parser.parse_args(argv)
  for spec in args.run:
    name, sep, config = spec.partition("=")
    if not sep:
      parser.error(f"--run {spec!r}: give name=experiments/x.py[:arg]")
    run_one(name, config, args.out, args.budget_minutes * 60, args.override,
            args.wall_minutes * 60)
  if args.plot:
    plot(args.out, args.plot, [n for n in args.only.split(",") if n],
         args.title)


if __name__ == "__main__":
  main()
