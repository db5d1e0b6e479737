r"""The results tables (issue 31's Must-show, and earlier issues') as one queue of runs.

    python benchmarks/gpu_tables.py --out OUT --workers 12 --budget_s 3000
    python benchmarks/gpu_tables.py --out OUT --groups dp --only 'dp/mr'
    python benchmarks/gpu_tables.py --out /tmp/gt --smoke   # CPU: does it run?
    python benchmarks/gpu_tables.py --out /tmp/gt --dry_run # the commands

Every run is a plain `python -m research.train` of an experiment module (the
commands are in results.jsonl), so each number can be reproduced alone. A
machine with one accelerator and many cores runs `--workers` of them at once
(each a process of its own; small models leave the card mostly idle). The
sentence pooling is every experiment's default, `config.model.pooling=auto`:
mean for the packaged all-MiniLM-L6-v2 (`--pooling pooler` runs the old
tables). Groups, most important first (`--groups`):

  peft     experiments/peft.py on the quickstart set, RTE and CoLA, the 7
           methods (full, lora, adalora, houlsby, pfeiffer, prefix, bitfit):
           each method's learning rate chosen on dev with seed 0 (LR_GRID),
           then seeds 1 and 2 at it;
  robust   experiments/robust.py on RTE and CoLA: plain and augment (3
           seeds); fgm, pgd, freelb, smart with the training ball chosen on
           dev with seed 0 (ROBUST_EPS_GRID), then seeds 1 and 2; the
           quickstart set at the shipped balls;
  dp       experiments/dp_sgd.py on MR (../shared/data/senteval_mr) and
           CoLA: the non-private recipe (3 seeds); DP-SGD's learning rate
           chosen on dev at epsilon 8 (seed 0, DP_LR_GRID), then epsilon 8,
           3 and 1 at it (3 seeds); on CoLA two diagnostics at the chosen
           rate (seed 0): automatic clipping (Bu et al. 2022) at epsilon 8,
           and clipping without noise (no privacy: does clipping alone
           collapse it?); then the quickstart set;
  conll    experiments/conll2003.py: the 3-epoch recipe on
           ../shared/data/conll2003 (valid.txt), lr 1e-4, 3 seeds;
  squad    SQuAD v1.1 on the shared ten articles: their answerable questions,
           articles 5 and 8 held out (`research.data.squad --answerable_only`),
           experiments/squad_v1.py (lr 1e-4), 3 seeds;
  tapt     continued pre-training on RTE's and CoLA's own training sentences,
           exported, then fine-tuned (after `peft`'s full fine-tuning);
  scratch  experiments/pretrain_wikitext.py, longer from-scratch curves of the
           cramming recipe and BERT's (docs/pretraining.md).

Each finished run appends one line to OUT/results.jsonl (its command, wall
time and summary.json); jobs not started when `--budget_s` runs out are
listed as skipped, running ones are stopped and listed as killed. The tables
(mean ± std over seeds, the learning rate or ball chosen) are printed last
and written to OUT/tables.md.
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
# Data sets read from SHARED (the device machine reaches no dataset server).
FOLDERS = {"cola": "glue_cola", "rte": "glue_rte", "mr": "senteval_mr"}


def data_dir(task):
  """The experiments' `data_dir=` of a task: its local TSVs in SHARED; ""
  for the shipped quickstart set."""
  return "" if task == "quickstart" else \
      f",data_dir={os.path.join(SHARED, FOLDERS[task])}"
SEEDS = (0, 1, 2)
PEFT_TASKS = ("quickstart", "rte", "cola")
GLUE = ("rte", "cola")
# Peak learning rates tried per method (seed 0, final dev metric decides).
LR_GRID = {"full": (2e-5, 5e-5, 1e-4, 2e-4), "lora": (5e-4, 1e-3, 2e-3, 5e-3),
           "adalora": (1e-3, 2e-3, 5e-3, 1e-2),
           "houlsby": (5e-4, 1e-3, 2e-3), "pfeiffer": (5e-4, 1e-3, 2e-3),
           "prefix": (2e-3, 5e-3, 1e-2), "bitfit": (1e-3, 5e-3, 1e-2)}
METRIC = {"cola": "matthews_corrcoef", "rte": "accuracy",
          "quickstart": "accuracy", "mr": "accuracy"}
# A constant predictor's dev metric: a run at it has collapsed.
MAJORITY = {"cola": 0.0, "rte": 0.527, "quickstart": 0.5, "mr": 0.521}
# TAPT (Gururangan et al. 2020): masked-LM steps on the task's train text.
TAPT = {"cola": ("glue_cola", "sentence", 64), "rte": ("glue_rte",
                                                       "sentence1;sentence2", 128)}
TAPT_STEPS, TAPT_BATCH = 1000, 64
PEFT_ARG = ""  # --peft_arg: more experiments/peft.py args (",pooler=true")
EXTRA = []     # --pooling: more flags for every research.train run
DP_TASKS = ("mr", "cola")
DP_EPSILONS = (0.0, 8.0, 3.0, 1.0)
# DP-SGD's peak learning rates tried at epsilon 8 (seed 0; the rest at the
# best). The search itself is not in the reported epsilon, as in the papers.
DP_LR_GRID = [1e-3, 5e-4, 2e-4]
DP_CHUNK = 0  # --dp_chunk: the dp_sgd method's chunk_size (0: the library's)
# Diagnostics of a collapse (CoLA, epsilon 8, the chosen rate, seed 0):
# name -> dp_sgd options given on the command line.
DP_DIAGNOSTICS = {
    "automatic": {"clipping": "automatic"},
    "clip_only": {"target_epsilon": -1.0, "noise_multiplier": 0.0},
}
ROBUST_METHODS = ("plain", "fgm", "pgd", "freelb", "smart", "augment")
# Training balls tried per method on RTE and CoLA (seed 0, the clean final
# dev metric decides; the shipped ball first). At their shipped balls FGM,
# PGD and FreeLB collapsed on RTE and CoLA with the pooler (BENCHMARKS.md).
ROBUST_EPS_GRID = {"fgm": (0.1, 0.03, 0.01), "pgd": (0.1, 0.03, 0.01),
                   "freelb": (0.3, 0.1, 0.03), "smart": (0.1, 0.03)}
CONLL_LR = 1e-4
SQUAD_LR = 1e-4
SQUAD_DEV_ARTICLES = "5,8"  # Spectre, To Kill a Mockingbird: 502 questions
# --smoke: one run per group (2 steps), with its follow-ups.
SMOKE_JOBS = ("peft/quickstart/full/lr2e-05/s0", "robust/rte/plain/s0",
              "dp/mr/full/lr0.001/eps8/s0", "conll/s0", "squad/prepare",
              "scratch/wikitext")


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

  def __init__(self, out, workers, budget_s, extra, max_follow=None):
    self.out, self.workers, self.extra = out, workers, list(extra)
    self.max_follow = max_follow  # follow-ups kept per job (None: all)
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
      follows = list(job.then(record, self) or ())[:self.max_follow]
      for follow in reversed(follows):
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
  """The value (a learning rate, a ball) of `names` ((value, job name),
  ...) with the best final dev metric, once every one of them has
  finished; None before that or when none reported a metric (ties: the
  first listed)."""
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
    if method == "full" and task in TAPT:
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
  extra = [f"--config.seed={seed}", *EXTRA]
  if model:
    extra.append(f"--config.model.name={model}")
  return Job(tag, group, f"experiments/peft.py:task={task},method={method},"
             f"lr={lr:g}{PEFT_ARG}{data_dir(task)}", os.path.join(work, tag),
             extra, then=then,
             row={"task": task, "method": method, "lr": lr, "seed": seed})


def _dp(work, task, method, eps, seed, lr=None, then=None, variant=None):
  """One run of experiments/dp_sgd.py (lr: replaces the recipe's; variant:
  a DP_DIAGNOSTICS entry)."""
  tag = f"dp/{task}/{method}" + (f"/{variant}" if variant else "") + (
      f"/lr{lr:g}" if lr else "") + f"/eps{eps:g}/s{seed}"
  extra = [f"--config.optimizer.learning_rate={lr:g}"] if lr else []
  if eps and DP_CHUNK:
    extra.append(f"--config.method_options.dp_sgd.chunk_size={DP_CHUNK}")
  for option, value in DP_DIAGNOSTICS.get(variant, {}).items():
    extra.append(f"--config.method_options.dp_sgd.{option}={value}")
  return Job(tag, "dp", f"experiments/dp_sgd.py:data={task},epsilon={eps:g},"
             f"seed={seed},method={method}{data_dir(task)}",
             os.path.join(work, tag), extra + EXTRA,
             then=then, row={"task": task, "epsilon": eps, "seed": seed,
                             "method": method, "lr": lr,
                             "variant": variant or ""})


def dp_lr_jobs(work, task, method, diagnostics=False):
  """DP_LR_GRID at the largest epsilon (seed 0), then every epsilon and
  seed at the best learning rate (and, with `diagnostics`, the
  DP_DIAGNOSTICS runs at it)."""
  names = []

  def pick(record, queue):
    del record
    best = best_lr(names, queue, task)
    if best is None:
      return ()
    follow = [_dp(work, task, method, eps, seed, lr=best)
              for seed in SEEDS for eps in DP_EPSILONS[1:]
              if (eps, seed) != (DP_EPSILONS[1], 0)]
    if diagnostics:
      follow += [_dp(work, task, method, DP_EPSILONS[1], 0, lr=best,
                     variant=name) for name in DP_DIAGNOSTICS]
    return follow

  jobs = []
  for lr in DP_LR_GRID:
    jobs.append(_dp(work, task, method, DP_EPSILONS[1], 0, lr=lr, then=pick))
    names.append((lr, jobs[-1].name))
  return jobs


def _robust(work, task, method, seed, eps=None, then=None):
  tag = f"robust/{task}/{method}" + (f"/eps{eps:g}" if eps else "") + \
      f"/s{seed}"
  arg = f",eps={eps:g}" if eps else ""
  return Job(tag, "robust", f"experiments/robust.py:data={task},"
             f"method={method},seed={seed}{arg}{data_dir(task)}",
             os.path.join(work, tag), list(EXTRA), then=then,
             row={"task": task, "method": method, "eps": eps, "seed": seed})


def robust_jobs(work, task, method):
  """A method with a ball: ROBUST_EPS_GRID at seed 0, then seeds 1-2 at the
  best clean dev metric; without one: 3 seeds."""
  if method not in ROBUST_EPS_GRID:
    return [_robust(work, task, method, seed) for seed in SEEDS]
  names = []

  def pick(record, queue):
    del record
    best = best_lr(names, queue, task)
    if best is None:
      return ()
    return [_robust(work, task, method, seed, best) for seed in SEEDS[1:]]

  jobs = []
  for eps in ROBUST_EPS_GRID[method]:
    jobs.append(_robust(work, task, method, 0, eps, then=pick))
    names.append((eps, jobs[-1].name))
  return jobs


def conll_jobs(work):
  """The CoNLL-2003 recipe, 3 epochs, on the shared column files."""
  folder = os.path.join(SHARED, "conll2003")
  return [Job(f"conll/s{seed}", "conll",
              "experiments/conll2003.py:model=all-minilm-l6-v2,source=local,"
              f"train_file={folder}/train.txt,eval_file={folder}/valid.txt",
              os.path.join(work, "conll", f"s{seed}"),
              [f"--config.seed={seed}", "--config.num_epochs=3",
               f"--config.optimizer.learning_rate={CONLL_LR:g}", *EXTRA],
              row={"task": "conll", "seed": seed}) for seed in SEEDS]


def squad_jobs(work):
  """SQuAD v1.1 on the shared articles: the split, then 3 seeds."""
  source = os.path.join(SHARED, "squad", "train-v2.0_first10articles.json")
  out = os.path.join(work, "squad", "data")
  name = "train-v2.0_first10articles-v1.1"
  prepare = Job("squad/prepare", "squad", "", os.path.join(out, "log"),
                module="research.data.squad", row={"stage": "prepare"})
  prepare.argv = [sys.executable, "-m", "research.data.squad", source, out,
                  "--dev_articles", SQUAD_DEV_ARTICLES, "--answerable_only"]

  def train(record, queue):
    del queue
    if record["status"] != "ok":
      return ()
    return [Job(f"squad/s{seed}", "squad",
                "experiments/squad_v1.py:model=all-minilm-l6-v2,source=local,"
                f"train_file={out}/{name}-train.json,"
                f"eval_file={out}/{name}-dev.json",
                os.path.join(work, "squad", f"s{seed}"),
                [f"--config.seed={seed}",
                 f"--config.optimizer.learning_rate={SQUAD_LR:g}", *EXTRA],
                row={"task": "squad", "seed": seed}) for seed in SEEDS]

  prepare.then = train
  return [prepare]


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
      # research.export kept the base's pooler and its declared pooling.
      if r["status"] != "ok":
        return ()
      return [_peft(work, task, "full", lr, s, model=hf_dir, group="tapt")
              for s in SEEDS]

    job.then = finetune
    return [job]

  pretrain.then = export
  return [pretrain]


def plan(work, groups, smoke, dp_method="full"):
  """Every job of `groups`, in priority order (follow-ups come later)."""
  chosen = {}
  jobs = []
  if "peft" in groups:
    for method in LR_GRID:
      for task in PEFT_TASKS:
        jobs += peft_jobs(work, task, method, chosen)
  if "robust" in groups:
    for task in GLUE:
      for method in ROBUST_METHODS:
        jobs += robust_jobs(work, task, method)
  if "dp" in groups:
    for task in DP_TASKS:
      jobs += [_dp(work, task, dp_method, 0.0, seed) for seed in SEEDS]
      jobs += dp_lr_jobs(work, task, dp_method, diagnostics=task == "cola")
  if "conll" in groups:
    jobs += conll_jobs(work)
  if "squad" in groups:
    jobs += squad_jobs(work)
  # The quickstart set (320 sentences) last.
  if "robust" in groups:
    jobs += [_robust(work, "quickstart", method, seed)
             for seed in SEEDS for method in ROBUST_METHODS]
  if "dp" in groups:
    jobs += [_dp(work, "quickstart", dp_method, eps, seed) for seed in SEEDS
             for eps in DP_EPSILONS]
  if "scratch" in groups:
    # The cramming recipe (the experiment's default) and BERT's, same budget.
    for recipe in ("cramming", "bert"):
      tag = "scratch/wikitext" + ("" if recipe == "cramming" else "_bert")
      arg = (f"recipe={recipe},smoke=true" if smoke else
             f"recipe={recipe},steps=2000,batch=64,eval_every=250,"
             "eval_rows=512") + f",data_dir={os.path.join(SHARED, 'wikitext')}"
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


def _collapsed(records, task):
  """Seeds whose final dev metric is within 0.01 of the majority class."""
  if task not in MAJORITY:
    return ""
  values = [final_metric(r, task) for r in records]
  n = sum(v is not None and abs(v - MAJORITY[task]) <= 0.01 for v in values)
  return f"{n} of {len(values)}" if n else ""


def tables(records):
  ok = [r for r in records if r.get("status") == "ok"]
  lines = []
  by = collections.defaultdict(list)
  for r in ok:
    if r["group"] in ("peft", "tapt") and "seed" in r["row"]:
      row = r["row"]
      by[(r["group"], row["task"], row["method"], row["lr"])].append(r)
  lines.append("| group | task | method | lr | dev metric | seeds | collapsed |")
  lines.append("|---|---|---|---|---|---|---|")
  for (group, task, method, lr), rs in sorted(by.items()):
    lines.append(f"| {group} | {task} | {method} | {lr:g} | "
                 f"{_mean_std([final_metric(r, task) for r in rs])} | "
                 f"{sorted(r['row']['seed'] for r in rs)} | "
                 f"{_collapsed(rs, task)} |")
  for group, keys in (("dp", ("method", "variant", "lr", "epsilon")),
                      ("robust", ("method", "eps")),
                      ("conll", ()), ("squad", ())):
    cells = collections.defaultdict(list)
    for r in ok:
      if r["group"] == group and "seed" in r["row"]:
        cells[(r["row"]["task"], *(r["row"].get(k) for k in keys))].append(r)
    if not cells:
      continue
    metric_keys = sorted({k for rs in cells.values() for r in rs
                          for k in r["summary"]
                          if k.startswith(("dev/", "eval/", "privacy/"))
                          and isinstance(r["summary"][k], (int, float))})
    lines += ["", f"| {group} | seeds | collapsed | " + " | ".join(metric_keys)
              + " |", "|---|---|---|" + "---|" * len(metric_keys)]
    for key, rs in sorted(cells.items(), key=str):
      values = [_mean_std([r["summary"].get(k) for r in rs])
                for k in metric_keys]
      lines.append(f"| {' '.join(map(str, key))} | "
                   f"{sorted(r['row']['seed'] for r in rs)} | "
                   f"{_collapsed(rs, key[0])} | " + " | ".join(values) + " |")
  for r in ok:
    if r["group"] in ("scratch",) or r["row"].get("stage") == "pretrain":
      s = r["summary"]
      lines.append(f"\n{r['name']}: " + ", ".join(
          f"{k}={v:.4g}" for k, v in sorted(s.items())
          if isinstance(v, (int, float)) and k.startswith(("dev/", "best/"))))
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--work", default="/tmp/gpu_tables")
  parser.add_argument("--workers", type=int, default=4)
  parser.add_argument("--budget_s", type=float, default=520)
  parser.add_argument("--groups",
                      default="peft,robust,dp,conll,squad,tapt,scratch")
  parser.add_argument("--only", default="",
                      help="a regular expression: only jobs whose name matches")
  parser.add_argument("--dp_method", default="full", choices=("full", "bitfit"),
                      help="experiments/dp_sgd.py's method= (bitfit: CPU-sized)")
  parser.add_argument("--dp_chunk", type=int, default=0,
                      help="the dp_sgd method's chunk_size in the DP runs (an "
                      "accelerator wants more examples per chunk than a CPU)")
  parser.add_argument("--peft_arg", default="",
                      help='appended to experiments/peft.py args: "pooler=true"')
  parser.add_argument("--pooling", default="",
                      choices=("", "auto", "pooler", "cls", "mean", "max"),
                      help="config.model.pooling of every run (default: the "
                      "experiments', auto)")
  parser.add_argument("--lr_grid", default="",
                      help='"bitfit=1e-3:5e-3,lora=1e-3": replaces LR_GRID '
                      "entries (and drops the methods not named)")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU check: 2 steps per run, one job per group "
                      "(and its follow-ups)")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the first jobs' commands; run nothing")
  parser.add_argument("--extra", default="",
                      help="more flags for every research.train run, "
                      "space-separated (e.g. --config.model.name=DIR)")
  args = parser.parse_args(argv)
  # The flags set the module's grids and options for this call only (tests
  # call main more than once).
  saved = (dict(LR_GRID), dict(ROBUST_EPS_GRID), list(DP_LR_GRID),
           list(EXTRA), PEFT_ARG, DP_CHUNK)
  try:
    return _main(args)
  finally:
    _restore(*saved)


def _restore(lr_grid, eps_grid, dp_grid, extra, peft_arg, dp_chunk):
  global PEFT_ARG, DP_CHUNK  # pylint: disable=global-statement
  LR_GRID.clear()
  LR_GRID.update(lr_grid)
  ROBUST_EPS_GRID.clear()
  ROBUST_EPS_GRID.update(eps_grid)
  DP_LR_GRID[:] = dp_grid
  EXTRA[:] = extra
  PEFT_ARG, DP_CHUNK = peft_arg, dp_chunk


def _main(args):
  """main's body, once the flags are parsed."""
  os.makedirs(args.out, exist_ok=True)
  os.environ.setdefault("WANDB_MODE", "disabled")  # metrics.jsonl keeps all
  groups = set(args.groups.split(","))
  global PEFT_ARG, DP_CHUNK  # pylint: disable=global-statement
  PEFT_ARG = "," + args.peft_arg if args.peft_arg else ""
  DP_CHUNK = args.dp_chunk
  EXTRA[:] = ([f"--config.model.pooling={args.pooling}"] if args.pooling
              else [])
  if args.lr_grid:
    grid = dict(item.split("=") for item in args.lr_grid.split(","))
    LR_GRID.clear()
    LR_GRID.update({m: tuple(map(float, v.split(":"))) for m, v in grid.items()})
  extra = args.extra.split()
  if args.smoke:
    extra += ["--config.total_steps=2", "--config.eval_every_steps=2"]
  if args.smoke:  # one run per group, one learning rate / ball (then TAPT)
    LR_GRID.update((k, v[:1]) for k, v in LR_GRID.items())
    ROBUST_EPS_GRID.update((k, v[:1]) for k, v in ROBUST_EPS_GRID.items())
    del DP_LR_GRID[1:]
  jobs = plan(args.work, groups, args.smoke, args.dp_method)
  if args.smoke:
    jobs = [job for job in jobs if job.name in SMOKE_JOBS]
  if args.only:
    jobs = [job for job in jobs if re.search(args.only, job.name)]
  if args.dry_run:
    for job in jobs:
      print(job.name, " ".join(job.argv[1:] + (
          extra if job.argv[2] == "research.train" else [])))
    print(f"{len(jobs)} jobs (follow-ups not listed)")
    return 0
  reading = [job.name for job in jobs if SHARED in " ".join(job.argv)]
  if reading and not os.path.isdir(SHARED):
    raise SystemExit(f"{SHARED} is absent and {len(reading)} jobs read it "
                     f"(e.g. {reading[0]}): copy the data sets there (the "
                     "device machine reaches no dataset server), or pick "
                     "--groups/--only without them")
  queue = Queue(args.out, args.workers, args.budget_s, extra,
                max_follow=1 if args.smoke else None)
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
  return 0 if set(counts) <= {"ok"} else 1


if __name__ == "__main__":
  sys.exit(main())
