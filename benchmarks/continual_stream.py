r"""The domain-shift stream: MR-trained MiniLM learning from CR feedback.

    python benchmarks/continual_stream.py --data_dir ../shared/data \
        --root /tmp/cl --seeds 0,1,2 --methods naive,replay,ewc,l2_sp,lora

Per seed: the deployed model (experiments/continual_reviews.py, one epoch
of MR), then `rounds x round_size` CR training sentences (a random draw of
the seed) sent to it through the serving path (`research.serve.engine`:
each prediction logged in a feedback store, then the correct label sent as
feedback through the store's API, as /feedback does), then for each method
a stream of rounds (`research.continual`) from the same base and the same
feedback. Prints one markdown table: MR dev accuracy after each round,
CR dev accuracy after each round, forgetting, backward transfer and CR
gain, mean ± std over seeds. Resumable: finished runs and streams are kept.
Round checkpoints are deleted once their round is recorded (the registry's
versions hold the models), to keep the disk bounded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))

import numpy as np  # pylint: disable=wrong-import-position

from research import cli, train  # pylint: disable=wrong-import-position
from research.continual import registry as registry_lib  # pylint: disable=wrong-import-position
from research.continual import rounds  # pylint: disable=wrong-import-position

EXPERIMENT = "experiments/continual_reviews.py"


def _experiment():
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                      EXPERIMENT)
  spec = importlib.util.spec_from_file_location("continual_reviews", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _arg(**kw):
  return ",".join(f"{k}={v}" for k, v in kw.items())


def base_run(exp, data_dir, root, seed):
  workdir = os.path.join(root, f"seed{seed}", "base")
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    config = exp.get_config(_arg(data_dir=data_dir, seed=seed))
    config.wandb.mode = "disabled"
    train.train_and_evaluate(config, workdir)
  return workdir


def feedback_db(base, data_dir, root, seed, count):
  """CR sentences served by the base model, each prediction logged, then
  corrected with its true label: the stream's feedback store."""
  from research.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from research.serve.store import FeedbackStore, PredictionRecord  # pylint: disable=import-outside-toplevel
  path = os.path.join(root, f"seed{seed}", "feedback.db")
  url = f"sqlite:///{path}"
  if os.path.exists(path):
    with FeedbackStore.open(url) as store:
      if store.count() >= count:
        return url
    os.remove(path)  # an interrupted fill: made again, the same way
  rows = [line.rstrip("\n").split("\t") for line in open(
      os.path.join(data_dir, "senteval_cr", "train.tsv"), encoding="utf-8")][1:]
  order = np.random.default_rng(seed).permutation(len(rows))[:count]
  eng = engine_lib.load(base, explain_methods=())
  eng.start(block=True)
  try:
    with FeedbackStore.open(url) as store:
      for lo in range(0, count, 32):
        picked = [rows[i] for i in order[lo:lo + 32]]
        items = [{"text": text} for _, text in picked]
        answers = eng.predict(items)
        records = [PredictionRecord(f"s{seed}-{lo + k}", eng.version,
                                    eng.task_name, item, answer)
                   for k, (item, answer) in enumerate(zip(items, answers))]
        store.add_predictions(records)
        for record, (label, _) in zip(records, picked):
          store.add_feedback(record.id, label=label)
  finally:
    eng.close()
  return url


def base_version(registry_dir, first_registry):
  """Copies the base version scored in `first_registry` into another
  method's empty registry (its config pointed at the copy): the same base
  for every method, exported and scored once per seed."""
  registry = registry_lib.Registry(registry_dir)
  if registry.current() is not None or first_registry is None:
    return
  source = registry_lib.Registry(first_registry)
  base = source.history()[0]["version"]
  target = os.path.join(registry.root, registry_lib.VERSIONS, base)
  shutil.copytree(source.path(base), target)
  config_path = os.path.join(target, "config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  config["model"]["name"] = os.path.join(target, "model")
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  registry.promote(base, "the base of a continual stream")


def stream(exp, data_dir, root, seed, method, base, db, rounds_n, size,
           first_registry=None):
  workdir = os.path.join(root, f"seed{seed}", method)
  base_version(os.path.join(root, f"seed{seed}", f"registry_{method}"),
               first_registry)
  config = exp.get_config(_arg(
      data_dir=data_dir, method=method, base=base, feedback_db=db, seed=seed,
      rounds=rounds_n, round_size=size,
      registry=os.path.join(root, f"seed{seed}", f"registry_{method}")))
  config.wandb.mode = "disabled"
  start = time.perf_counter()
  s = rounds.Stream(config, workdir)
  state = s.state()
  while state["round"] < rounds_n:
    after = s.run_round(state)
    if after is None:
      raise RuntimeError(f"{db}: not enough feedback for round "
                         f"{state['round'] + 1}")
    state = after
    # The round's run is recorded and its version registered: its
    # checkpoints are no longer needed.
    for ckpt in glob.glob(os.path.join(workdir, "rounds", "*", "run",
                                       "checkpoints")):
      shutil.rmtree(ckpt, ignore_errors=True)
  return rounds.table_row(state, s.registry, config.eval_metric), \
      time.perf_counter() - start


def _fmt(values):
  values = np.asarray(values, np.float64) * 100
  if len(values) == 1:
    return f"{values[0]:.1f}"
  return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--root", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--methods", default="naive,replay,ewc,l2_sp,lora")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--round_size", type=int, default=100)
  parser.add_argument("--report", action="store_true",
                      help="only print the table of the finished streams")
  a = parser.parse_args()
  exp = _experiment()
  seeds = [int(s) for s in a.seeds.split(",")]
  methods = a.methods.split(",")
  cli.configure_process(exp.get_config(_arg(data_dir=a.data_dir)))
  results = {m: [] for m in methods}
  for seed in seeds if a.report else ():
    for method in methods:
      state = rounds._read_json(os.path.join(a.root, f"seed{seed}", method,  # pylint: disable=protected-access
                                             rounds.STATE))
      if state and state["round"] == a.rounds:
        results[method].append(rounds.table_row(state, registry_lib.Registry(
            os.path.join(a.root, f"seed{seed}", f"registry_{method}")),
                                                "accuracy"))
  for seed in () if a.report else seeds:
    base = base_run(exp, a.data_dir, a.root, seed)
    db = feedback_db(base, a.data_dir, a.root, seed, a.rounds * a.round_size)
    for i, method in enumerate(methods):
      first = os.path.join(a.root, f"seed{seed}", f"registry_{methods[0]}")
      row, seconds = stream(exp, a.data_dir, a.root, seed, method, base, db,
                            a.rounds, a.round_size, first if i else None)
      results[method].append(row)
      print(f"seed {seed} {method}: {json.dumps(row)} ({seconds:.0f} s)",
            flush=True)
  print(f"\nbenchmarks/continual_stream.py --seeds {a.seeds} --rounds "
        f"{a.rounds} --round_size {a.round_size}; data: MR (old) and CR "
        f"(new) of {a.data_dir}; {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} CPUs; accuracy %, mean ± std over seeds "
        f"{a.seeds}\n")
  r = a.rounds
  print("| method | seeds | MR dev after rounds 0.." + str(r) + " | CR dev "
        "after rounds 0.." + str(r) + " | forgetting (MR) | worst MR drop | "
        "BWT (MR) | CR gain | gate passed (of " + str(r) + ") |")
  print("|---|---|---|---|---|---|---|---|---|")
  for method, rows in results.items():
    if not rows:
      continue
    old = " / ".join(_fmt([x["old"][t] for x in rows]) for t in range(r + 1))
    new = " / ".join(_fmt([x["new"][t] for x in rows]) for t in range(r + 1))
    print(f"| {method} | {len(rows)} | {old} | {new} | "
          f"{_fmt([x['forgetting'] for x in rows])} | "
          f"{_fmt([x['worst_drop'] for x in rows])} | "
          f"{_fmt([x['bwt'] for x in rows])} | "
          f"{_fmt([x['gain'] for x in rows])} | "
          f"{' / '.join(str(x['gate_passed']) for x in rows)} |")


if __name__ == "__main__":
  main()
