r"""Knowledge masking against whole-word and span masking: TAPT, then fine-tuning.

    nice -n 15 python benchmarks/knowledge_masking.py --out /tmp/km
    nice -n 15 python benchmarks/knowledge_masking.py --out /tmp/km --smoke  # CPU check

`--data_dir` holds conll2003/ and glue_rte/ (default ../shared/data, which
a fresh clone lacks; the script stops naming what is missing).

For each task (CoNLL-2003 NER, GLUE RTE) and each masking mode (whole_word,
span, knowledge), task-adaptive pre-training (TAPT, Gururangan et al. 2020)
of the packaged MiniLM on the task's own training text
(`experiments/continue_pretraining.py`), exported (`research.export`), then
fine-tuned with seeds 0, 1, 2; the arm "none" fine-tunes MiniLM itself. The
knowledge lists (`research.data.knowledge`):
  conll  the gold entity strings of CoNLL's train.txt;
  rte    the proper-noun phrases of RTE's training text (the "capitalised"
         extractor; spaCy's model cannot be downloaded here).
Fine-tuning: CoNLL `experiments/conll2003.py` (lr 1e-4, --epochs) scored by
entity F1 on valid.txt; RTE `experiments/peft.py:task=rte,method=full`
(lr 1e-4, 3 epochs) scored by dev accuracy. Each run's final evaluation
counts (no selection on dev). Order: TAPT of a task, then seed 0 of its
four arms, the other task, then seeds 1 and 2, so that a cut-short queue
still compares every arm. Finished runs are kept (a rerun skips them);
`<out>/results.md` is rewritten after every run: mean +- std per arm and
the runs it holds, with wall minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # this checkout's research/, not an installed one
  sys.path.insert(0, REPO)
# --data_dir's default: the copies beside the repository on this project's
# machines (a fresh clone has none: pass --data_dir).
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
FOLDERS = {"conll": "conll2003", "rte": "glue_rte"}
ARMS = ("none", "whole_word", "span", "knowledge")
METRIC = {"conll": "eval/entity_f1", "rte": "eval/accuracy"}


def prepare(out, data_dir):
  """Text files and knowledge lists derived from `data_dir`'s CoNLL and RTE."""
  conll_dir = os.path.join(data_dir, FOLDERS["conll"])
  rte_dir = os.path.join(data_dir, FOLDERS["rte"])
  from research.data import conll, knowledge  # pylint: disable=import-outside-toplevel
  data = os.path.join(out, "data")
  os.makedirs(data, exist_ok=True)
  for split in ("train", "valid"):
    path = os.path.join(data, f"conll_{split}.txt")
    if not os.path.exists(path):
      sentences = conll.read_conll(os.path.join(conll_dir, f"{split}.txt")).tokens
      with open(path, "w", encoding="utf-8") as f:
        f.write("".join(" ".join(s) + "\n" for s in sentences))
  lists = {"conll": os.path.join(data, "conll_entities.txt"),
           "rte": os.path.join(data, "rte_names.txt")}
  if not os.path.exists(lists["conll"]):
    knowledge.main(["--conll", os.path.join(conll_dir, "train.txt"),
                    "--out", lists["conll"]])
  if not os.path.exists(lists["rte"]):
    knowledge.main(["--table", os.path.join(rte_dir, "train.tsv"), "--columns",
                    "sentence1,sentence2", "--out", lists["rte"]])
  return data, lists


def train(workdir, config, overrides=(), log_name="train.log"):
  """One research.train run (skipped when its summary exists)."""
  summary = os.path.join(workdir, "summary.json")
  if os.path.exists(summary):
    return json.load(open(summary)), 0.0  # pylint: disable=consider-using-with
  os.makedirs(workdir, exist_ok=True)
  command = [sys.executable, "-m", "research.train", "--config", config,
             "--workdir", workdir, "--config.wandb.mode=disabled", *overrides]
  print("+", " ".join(command), flush=True)
  start = time.time()
  with open(os.path.join(workdir, log_name), "a") as log:
    rc = subprocess.call(command, cwd=REPO, stdout=log,
                         stderr=subprocess.STDOUT)
  minutes = (time.time() - start) / 60
  with open(os.path.join(workdir, "wall_minutes"), "w") as f:
    f.write(f"{minutes:.1f} load1={os.getloadavg()[0]:.1f}\n")
  if rc != 0:
    raise RuntimeError(f"{workdir}: research.train exited {rc} (see "
                       f"{log_name})")
  return json.load(open(summary)), minutes  # pylint: disable=consider-using-with


def tapt(out, task, arm, data, lists, args):
  """TAPT of MiniLM with one masking mode; returns the exported model."""
  workdir = os.path.join(out, "tapt", f"{task}_{arm}")
  common = (f"steps={args.tapt_steps},batch={args.batch},max_length=128,"
            f"eval_every={args.tapt_steps},eval_rows=128,lr=3e-4,"
            f"masking={arm}")
  if arm == "knowledge":
    common += f",knowledge={lists[task]}"
  if task == "conll":
    config = (f"experiments/continue_pretraining.py:files={data}/"
              f"conll_train.txt,eval={data}/conll_valid.txt,{common}")
  else:
    rte = os.path.join(args.data_dir, FOLDERS["rte"])
    config = (f"experiments/continue_pretraining.py:table={rte}/train.tsv,"
              f"eval={rte}/dev.tsv,columns=sentence1;sentence2,{common}")
  train(workdir, config)
  hf = os.path.join(workdir, "hf")
  if not os.path.exists(os.path.join(hf, "config.json")):
    subprocess.check_call([sys.executable, "-m", "research.export",
                           "--workdir", workdir, "--out", hf, "--which",
                           "latest"], cwd=REPO)
  return hf


def finetune(out, task, arm, seed, model, args):
  workdir = os.path.join(out, "ft", f"{task}_{arm}_s{seed}")
  overrides = [f"--config.seed={seed}"]
  if model:
    overrides.append(f"--config.model.name={model}")
  if task == "conll":
    conll_dir = os.path.join(args.data_dir, FOLDERS["conll"])
    config = ("experiments/conll2003.py:model=all-minilm-l6-v2,source=local,"
              f"train_file={conll_dir}/train.txt,"
              f"eval_file={conll_dir}/valid.txt")
    overrides += ["--config.optimizer.learning_rate=1e-4",
                  f"--config.num_epochs={args.conll_epochs}"]
  else:
    rte_dir = os.path.join(args.data_dir, FOLDERS["rte"])
    config = ("experiments/peft.py:task=rte,method=full,lr=1e-4,"
              f"data_dir={rte_dir}")
  if args.smoke:
    overrides += ["--config.total_steps=4", "--config.eval_every_steps=4"]
  summary, _ = train(workdir, config, overrides)
  return summary[METRIC[task]]


def write_results(out, results):
  lines = ["| task | arm | metric | mean ± std | runs (seed: value) |",
           "|---|---|---|---|---|"]
  for (task, arm), values in sorted(results.items()):
    v = np.asarray(list(values.values()))
    std = f"{v.std(ddof=1):.4f}" if len(v) > 1 else "n/a"
    lines.append(f"| {task} | {arm} | {METRIC[task]} | {v.mean():.4f} ± "
                 f"{std} (n={len(v)}) | " + ", ".join(
                     f"{s}: {x:.4f}" for s, x in sorted(values.items())) + " |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--tasks", default="conll,rte")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--tapt_steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--conll_epochs", type=float, default=1.0)
  parser.add_argument("--smoke", action="store_true",
                      help="4-step runs: a check that the queue works")
  parser.add_argument("--data_dir", default=SHARED,
                      help="Holds conll2003/ (train.txt, valid.txt) and "
                      "glue_rte/ (train.tsv, dev.tsv); default: %(default)s")
  args = parser.parse_args(argv)
  # Both folders feed the knowledge lists and the TAPT text, whatever --tasks.
  missing = [os.path.join(args.data_dir, f) for f in FOLDERS.values()
             if not os.path.isdir(os.path.join(args.data_dir, f))]
  if missing:
    parser.error(f"{', '.join(missing)} absent: pass --data_dir (the folder "
                 "holding conll2003/ and glue_rte/)")
  if args.smoke:
    args.tapt_steps = 4
  data, lists = prepare(args.out, args.data_dir)
  tasks = args.tasks.split(",")
  arms = args.arms.split(",")
  results = {}
  models = {}
  for seed in (int(s) for s in args.seeds.split(",")):
    for task in tasks:
      for arm in arms:
        if arm != "none" and (task, arm) not in models:
          models[task, arm] = tapt(args.out, task, arm, data, lists, args)
        value = finetune(args.out, task, arm, seed,
                         models.get((task, arm)), args)
        results.setdefault((task, arm), {})[seed] = value
        write_results(args.out, results)


if __name__ == "__main__":
  main()
