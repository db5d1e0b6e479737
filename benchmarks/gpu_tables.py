r"""The results tables of issues 18, 20, 21 and 22 as one queue of training runs.

    python benchmarks/gpu_tables.py --out OUT --workers 10 --budget_s 520
    python benchmarks/gpu_tables.py --out /tmp/gt --smoke   # CPU: does it run?

Every run is a plain `python -m research.train` of an experiment module (the
commands are in results.jsonl), so each number can be reproduced alone. A
machine with one accelerator and many cores runs `--workers` of them at once
(each a process of its own; small models leave the card mostly idle). Groups,
most important first:

  peft     experiments/peft.py on CoLA and RTE: each method's learning rate
           chosen on dev with seed 0 (LR_GRID), then seeds 1 and 2 at it;
  tapt     experiments/continue_pretraining.py on the task's own training
           sentences, exported, then fine-tuned (method=full, the learning
           rate `peft` chose, seeds 0-2) against `peft`'s full fine-tuning;
  dp       experiments/dp_sgd.py on CoLA: non-private; the DP learning
           rate chosen on dev at epsilon 8 (seed 0, DP_LR_GRID), then
           epsilon 8, 3, 1 at it;
  robust   experiments/robust.py on CoLA and RTE: plain, FGM, PGD, FreeLB,
           EDA augmentation;
  (then dp and robust again on the quickstart set);
  scratch  experiments/pretrain_wikitext.py, longer from-scratch curves of the
           cramming recipe and BERT's (docs/results/pretraining.md).

Each finished run appends one line to OUT/results.jsonl (its command, wall
time and summary.json); jobs not started when `--budget_s` runs out are
listed as skipped, running ones are stopped and listed as killed. The tables
(mean ± std over seeds) are printed last and written to OUT/tables.md.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
SEEDS = (0, 1, 2)
PEFT_TASKS = ("cola", "rte")
# Peak learning rates tried per method (seed 0, final dev metric decides).
LR_GRID = {"full": (2e-5, 5e-5, 1e-4), "lora": (5e-4, 1e-3, 2e-3, 5e-3),
           "adalora": (1e-3, 2e-3, 5e-3), "houlsby": (5e-4, 1e-3, 2e-3),
           "prefix": (2e-3, 5e-3, 1e-2), "bitfit": (1e-3, 5e-3, 1e-2)}
METRIC = {"cola": "matthews_corrcoef", "rte": "accuracy",
          "quickstart": "accuracy"}
# TAPT (Gururangan et al. 2020): masked-LM steps on the task's train text.
TAPT = {"cola": ("glue_cola", "sentence", 64), "rte": ("glue_rte",
                                                       "sentence1;sentence2", 128)}
TAPT_STEPS, TAPT_BATCH = 1000, 64
PEFT_ARG = ""  # --peft_arg: more experiments/peft.py args (",pooler=true")
DP_EPSILONS = (0.0, 8.0, 3.0, 1.0)
# DP-SGD's peak learning rates tried on CoLA (epsilon 8, seed 0; the rest at
# the best). Measured: all three end at the majority class (BENCHMARKS.md).
# The search itself is not in the reported epsilon, as in the papers.
DP_LR_GRID = (5e-4, 2e-4, 1e-4)
DP_CHUNK = 0  # --dp_chunk: config.privacy.chunk_size (0: the library's)
ROBUST_METHODS = ("plain", "fgm", "pgd", "freelb", "augment", "smart")
# On CoLA and RTE the default training balls (0.1, FreeLB 0.3) collapse to a
# constant prediction; these methods run again at a smaller ball.
ROBUST_SMALL_EPS = {"fgm": 0.03, "pgd": 0.03, "freelb": 0.03}
SMOKE_JOBS = ("peft/cola/full/lr2e-05/s0", "dp/cola/full/lr0.0005/eps8/s0",
              "robust/rte/freelb/s0", "scratch/wikitext")


class Job:
  """One training run: `python -m research.train` with these arguments."""

  def __init__(self, name, group, config, workdir, extra=(), row=None,
               then=None, module="research.train"):
    self.name, self.group, self.row = name, group, row or {}
    self.workdir, self.then = workdir, then
    self.argv = [sys.executable, "-m", module, "--config", config,
                 "--workdir", workdir, *extra]
    self.proc = self.log = self.start = None


def config_digest():
  """sha256 of the config modules' text (experiments/, research/configs/)."""
  digest = hashlib.sha256()
  for folder in ("experiments", os.path.join("research", "configs")):
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
      if name.endswith(".py"):
        with open(os.path.join(ROOT, folder, name), "rb") as f:
          digest.update(name.encode() + b"\0" + f.read())
  return digest.hexdigest()


class Queue:
  """Runs jobs `workers` at a time; a finished job may add follow-up jobs.

  A job's folder is stamped (STAMP) with its command and the config
  modules' digest: a finished run there is reused, and a stopped one
  resumes (research.train resumes from the folder's checkpoint), only while
  both are unchanged; a folder of another command or config version is
  moved aside (`<folder>.stale-<time>`), never resumed or reported.
  """
  STAMP = "gpu_tables.stamp"

  def __init__(self, out, workers, budget_s, extra):
    self.out, self.workers, self.extra = out, workers, list(extra)
    self.deadline = time.time() + budget_s
    self.digest = config_digest()
    self.pending, self.running, self.done = [], [], {}
    self.results = open(os.path.join(out, "results.jsonl"), "a")

  def add(self, job, first=False):
    if job.argv[2] == "research.train":
      job.argv += self.extra
    self.pending.insert(0 if first else len(self.pending), job)

  def _finish(self, job, status):
    summary = {}
    path = os.path.join(job.workdir, "summary.json")
    if status == "ok" and os.path.exists(path):
      with open(path) as f:
        summary = json.load(f)
    elif status == "ok" and job.argv[2] == "research.train":
      status = "no summary"
    record = {"name": job.name, "group": job.group, "row": job.row,
              "status": status, "wall_s": round(time.time() - job.start, 1),
              "command": " ".join(job.argv[1:]), "summary": summary}
    metrics = os.path.join(job.workdir, "metrics.jsonl")
    if job.group == "scratch" and os.path.exists(metrics):  # the curve
      with open(metrics) as src, open(os.path.join(
          self.out, f"scratch_{job.row['recipe']}_metrics.jsonl"),
                                      "w") as dst:
        dst.write(src.read())
    if status != "ok":
      with open(job.log) as f:
        record["log_tail"] = f.read()[-3000:]
    self.results.write(json.dumps(record, default=float) + "\n")
    self.results.flush()
    self.done[job.name] = record
    print(f"[{time.strftime('%H:%M:%S')}] {status:8s} {record['wall_s']:6.1f}s "
          f"{job.name}", flush=True)
    if job.then:  # follow-ups first: they complete a table row
      for follow in reversed(list(job.then(record, self) or ())):
        self.add(follow, first=True)

  def run(self):
    while self.pending or self.running:
      for job in list(self.running):
        if job.proc.poll() is not None:
          self.running.remove(job)
          self._finish(job, "ok" if job.proc.returncode == 0
                       else f"rc={job.proc.returncode}")
      left = self.deadline - time.time()
      if left <= 0:
        for job in self.running:
          job.proc.kill()
          job.proc.wait()
          self._finish(job, "killed")
        for job in self.pending:
          self.results.write(json.dumps({"name": job.name, "group": job.group,
                                         "row": job.row, "status": "skipped"}) + "\n")
        self.results.flush()
        print(f"budget spent: {len(self.pending)} jobs not started", flush=True)
        return
      while self.pending and len(self.running) < self.workers:
        job = self.pending.pop(0)
        stamp = " ".join(job.argv[1:]) + "\n" + self.digest + "\n"
        path = os.path.join(job.workdir, self.STAMP)
        same = False
        if os.path.exists(path):
          with open(path) as f:
            same = f.read() == stamp
        if same and os.path.exists(os.path.join(job.workdir, "summary.json")):
          job.start, job.proc = time.time(), None  # done by an earlier call
          self._finish(job, "ok")
          continue
        if not same and os.path.exists(job.workdir):
          os.rename(job.workdir, f"{job.workdir}.stale-{time.time_ns()}")
        os.makedirs(job.workdir, exist_ok=True)
        with open(path, "w") as f:
          f.write(stamp)
        job.log = os.path.join(job.workdir, "log.txt")
        job.start = time.time()
        with open(job.log, "w") as log:
          job.proc = subprocess.Popen(job.argv, cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT)
        self.running.append(job)
      time.sleep(0.5)


# --- The plan -----------------------------------------------------------------


def final_metric(record, task):
  """The dev metric at the end of training (no checkpoint chosen on dev)."""
  summary = record.get("summary") or {}
  for key in (f"dev/{METRIC[task]}", METRIC[task], f"eval/{METRIC[task]}"):
    if key in summary:
      return float(summary[key])
  return None


def best_lr(names, queue, task):
  """The learning rate of `names` ((lr, job name), ...) with the best final
  dev metric, once every one of them has finished; None before that or when
  none reported a metric (ties: the first listed)."""
  if any(n not in queue.done for _, n in names):
    return None
  scores = {lr: final_metric(queue.done[n], task) for lr, n in names}
  valid = {lr: v for lr, v in scores.items() if v is not None}
  return max(valid, key=valid.get) if valid else None


def peft_jobs(work, task, method, chosen):
  """The lr sweep (seed 0) of one method; then seeds 1-2 at the best lr."""
  names = []

  def pick(record, queue):
    del record
    best = best_lr(names, queue, task)
    if best is None:
      return ()
    chosen[(task, method)] = best
    follow = [_peft(work, task, method, best, seed) for seed in SEEDS[1:]]
    if method == "full":
      follow += tapt_jobs(work, task, best)
    return follow

  jobs = []
  for lr in LR_GRID[method]:
    job = _peft(work, task, method, lr, 0, then=pick)
    names.append((lr, job.name))
    jobs.append(job)
  return jobs


def _peft(work, task, method, lr, seed, then=None, model=None, group="peft"):
  tag = (f"{group}/{task}/{method}{PEFT_ARG.replace('=', '_').replace(',', '+')}"
         f"/lr{lr:g}/s{seed}")
  extra = [f"--config.seed={seed}"]
  if model:
    extra.append(f"--config.model.name={model}")
  return Job(tag, group, f"experiments/peft.py:task={task},method={method},"
             f"lr={lr:g}{PEFT_ARG}", os.path.join(work, tag), extra, then=then,
             row={"task": task, "method": method, "lr": lr, "seed": seed})


def _dp(work, task, method, eps, seed, lr=None, then=None):
  """One run of experiments/dp_sgd.py (lr: replaces the recipe's)."""
  tag = f"dp/{task}/{method}" + (f"/lr{lr:g}" if lr else "") + \
      f"/eps{eps:g}/s{seed}"
  extra = [f"--config.optimizer.learning_rate={lr:g}"] if lr else []
  if eps and DP_CHUNK:
    extra.append(f"--config.privacy.chunk_size={DP_CHUNK}")
  return Job(tag, "dp", f"experiments/dp_sgd.py:data={task},epsilon={eps:g},"
             f"seed={seed},method={method}", os.path.join(work, tag), extra,
             then=then, row={"task": task, "epsilon": eps, "seed": seed,
                             "method": method, "lr": lr})


def dp_lr_jobs(work, task, method):
  """DP_LR_GRID at the largest epsilon (seed 0), then every epsilon and
  seed at the best learning rate."""
  names = []

  def pick(record, queue):
    del record
    best = best_lr(names, queue, task)
    if best is None:
      return ()
    return [_dp(work, task, method, eps, seed, lr=best)
            for seed in SEEDS for eps in DP_EPSILONS[1:]
            if (eps, seed) != (DP_EPSILONS[1], 0)]

  jobs = []
  for lr in DP_LR_GRID:
    jobs.append(_dp(work, task, method, DP_EPSILONS[1], 0, lr=lr, then=pick))
    names.append((lr, jobs[-1].name))
  return jobs


def tapt_jobs(work, task, lr):
  """Continued pre-training on the task's train text, export, fine-tune."""
  folder, columns, length = TAPT[task]
  pre = os.path.join(work, "tapt", task, "pretrain")
  hf_dir = os.path.join(pre, "hf")
  table = os.path.join(SHARED, folder, "train.tsv")
  dev = os.path.join(SHARED, folder, "dev.tsv")
  pretrain = Job(f"tapt/{task}/pretrain", "tapt",
                 f"experiments/continue_pretraining.py:table={table},"
                 f"eval={dev},columns={columns},steps={TAPT_STEPS},"
                 f"batch={TAPT_BATCH},max_length={length},eval_every=250",
                 pre, row={"task": task, "stage": "pretrain"})

  def export(record, queue):
    del queue
    if record["status"] != "ok":
      return ()
    job = Job(f"tapt/{task}/export", "tapt", "", pre, module="research.export",
              row={"task": task, "stage": "export"})
    job.argv = [sys.executable, "-m", "research.export", "--workdir", pre,
                "--out", hf_dir]
    job.workdir = os.path.join(pre, "export_log")
    def finetune(r, q):
      del q
      if r["status"] != "ok":  # research.export kept the base's pooler
        return ()
      return [_peft(work, task, "full", lr, s, model=hf_dir, group="tapt")
              for s in SEEDS]

    job.then = finetune
    return [job]

  pretrain.then = export
  return [pretrain]


def plan(work, groups, smoke, dp_method="full"):
  chosen = {}
  jobs = []
  if "peft" in groups:
    for method in LR_GRID:
      for task in PEFT_TASKS:
        jobs += peft_jobs(work, task, method, chosen)
  # CoLA and RTE first (DP's long runs first of all); the quickstart set
  # (320 sentences) last.
  for data, group in (("glue", "dp"), ("glue", "robust"),
                      ("quickstart", "robust"), ("quickstart", "dp")):
    if group == "dp" and "dp" in groups:
      task = "cola" if data == "glue" else data
      jobs += [_dp(work, task, dp_method, 0.0, seed) for seed in SEEDS]
      if data == "glue":
        jobs += dp_lr_jobs(work, task, dp_method)
      else:
        jobs += [_dp(work, task, dp_method, eps, seed) for seed in SEEDS
                 for eps in DP_EPSILONS[1:]]
    if group == "robust" and "robust" in groups:
      for seed in SEEDS:
        for task in (PEFT_TASKS if data == "glue" else (data,)):
          variants = [(m, None) for m in ROBUST_METHODS]
          if data == "glue":
            variants += list(ROBUST_SMALL_EPS.items())
          for method, eps in variants:
            name = method if eps is None else f"{method}_eps{eps:g}"
            tag = f"robust/{task}/{name}/s{seed}"
            arg = "" if eps is None else f",eps={eps:g}"
            jobs.append(Job(tag, "robust", f"experiments/robust.py:data={task},"
                            f"method={method},seed={seed}{arg}",
                            os.path.join(work, tag),
                            row={"task": task, "method": method, "eps": eps,
                                 "seed": seed}))
  if "scratch" in groups:
    # The cramming recipe (the experiment's default) and BERT's, same budget.
    for recipe in ("cramming", "bert"):
      tag = "scratch/wikitext" + ("" if recipe == "cramming" else "_bert")
      arg = (f"recipe={recipe},smoke=true" if smoke else
             f"recipe={recipe},steps=2000,batch=64,eval_every=250,"
             "eval_rows=512")
      jobs.append(Job(tag, "scratch", f"experiments/pretrain_wikitext.py:{arg}",
                      os.path.join(work, tag),
                      row={"stage": "scratch", "recipe": recipe}))
  return jobs


# --- The tables ---------------------------------------------------------------


def _mean_std(values):
  values = [v for v in values if isinstance(v, (int, float))]
  if not values:
    return "—"
  if len(values) == 1:
    return f"{values[0]:.3f} (n=1)"
  return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} "
          f"(n={len(values)})")


def tables(records):
  ok = [r for r in records if r.get("status") == "ok"]
  lines = []
  by = collections.defaultdict(list)
  for r in ok:
    if r["group"] in ("peft", "tapt") and "seed" in r["row"]:
      row = r["row"]
      by[(r["group"], row["task"], row["method"], row["lr"])].append(r)
  lines.append("| group | task | method | lr | dev metric | seeds |")
  lines.append("|---|---|---|---|---|---|")
  for (group, task, method, lr), rs in sorted(by.items()):
    lines.append(f"| {group} | {task} | {method} | {lr:g} | "
                 f"{_mean_std([final_metric(r, task) for r in rs])} | "
                 f"{sorted(r['row']['seed'] for r in rs)} |")
  for group, keys in (("dp", ("method", "lr", "epsilon")),
                      ("robust", ("method", "eps"))):
    cells = collections.defaultdict(list)
    for r in ok:
      if r["group"] == group:
        cells[(r["row"]["task"], *(r["row"].get(k) for k in keys))].append(r)
    if not cells:
      continue
    metric_keys = sorted({k for rs in cells.values() for r in rs
                          for k in r["summary"]
                          if k.startswith(("dev/", "eval/", "privacy/"))})
    lines += ["", f"| {group} | " + " | ".join(metric_keys) + " |",
              "|---|" + "---|" * len(metric_keys)]
    for key, rs in sorted(cells.items(), key=str):
      values = [_mean_std([r["summary"].get(k) for r in rs])
                for k in metric_keys]
      lines.append(f"| {' '.join(map(str, key))} | " + " | ".join(values) + " |")
  for r in ok:
    if r["group"] in ("scratch",) or r["row"].get("stage") == "pretrain":
      s = r["summary"]
      lines.append(f"\n{r['name']}: " + ", ".join(
          f"{k}={v:.4g}" for k, v in sorted(s.items())
          if isinstance(v, (int, float)) and k.startswith(("dev/", "best/"))))
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--work", default="/tmp/gpu_tables")
  parser.add_argument("--workers", type=int, default=4)
  parser.add_argument("--budget_s", type=float, default=520)
  parser.add_argument("--groups", default="peft,tapt,dp,robust,scratch")
  parser.add_argument("--only", default="",
                      help="a regular expression: only jobs whose name matches")
  parser.add_argument("--dp_method", default="full", choices=("full", "bitfit"),
                      help="experiments/dp_sgd.py's method= (bitfit: CPU-sized)")
  parser.add_argument("--dp_chunk", type=int, default=0,
                      help="config.privacy.chunk_size of the DP runs (an "
                      "accelerator wants more examples per chunk than a CPU)")
  parser.add_argument("--peft_arg", default="",
                      help='appended to experiments/peft.py args: "pooler=true"')
  parser.add_argument("--lr_grid", default="",
                      help='"bitfit=1e-3:5e-3,lora=1e-3": replaces LR_GRID '
                      "entries (and drops the methods not named)")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU check: 2 steps per run, one job per group")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  os.environ.setdefault("WANDB_MODE", "disabled")  # metrics.jsonl keeps all
  groups = set(args.groups.split(","))
  global PEFT_ARG, DP_CHUNK  # pylint: disable=global-statement
  PEFT_ARG = "," + args.peft_arg if args.peft_arg else ""
  DP_CHUNK = args.dp_chunk
  if args.lr_grid:
    grid = dict(item.split("=") for item in args.lr_grid.split(","))
    LR_GRID.clear()
    LR_GRID.update({m: tuple(map(float, v.split(":"))) for m, v in grid.items()})
  extra = []
  if args.smoke:
    extra = ["--config.total_steps=2", "--config.eval_every_steps=2"]
  queue = Queue(args.out, args.workers, args.budget_s, extra)
  jobs = plan(args.work, groups, args.smoke, args.dp_method)
  if args.smoke:  # one run per group, one learning rate (then TAPT)
    LR_GRID.update((k, v[:1]) for k, v in LR_GRID.items())
    jobs = [job for job in plan(args.work, groups, args.smoke)
            if job.name in SMOKE_JOBS]
  if args.only:
    jobs = [job for job in jobs if re.search(args.only, job.name)]
  for job in jobs:
    queue.add(job)
  queue.run()
  with open(os.path.join(args.out, "results.jsonl")) as f:
    records = [json.loads(line) for line in f]
  text = tables(records)
  with open(os.path.join(args.out, "tables.md"), "w") as f:
    f.write(text + "\n")
  counts = collections.Counter(r["status"] for r in records)
  print(text)
  print("status:", dict(counts))


if __name__ == "__main__":
  main()
