"""Step time and step memory of each PEFT method beside full fine-tuning.

    python benchmarks/peft_overhead.py --task quickstart --rounds 10
    python benchmarks/peft_overhead.py --task cola --methods full,lora --rounds 5

Builds one run per method (`experiments/peft.py`, through `train.build`, as
`research.bench` does), compiles each update step for one batch width, then
times the steps in alternation (round r: full, lora, adalora, ...), so that
on a shared machine every method sees the same load; prints the median step
time and its ratio to full fine-tuning. Memory: XLA's buffer assignment of
the compiled step (`memory_analysis()`: arguments + temporaries + outputs
not aliased to donated inputs), the same on any host load, and the trainable
and frozen bytes. CPU backends report no device peak, so this is what a CPU
run can say about memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere: experiments/ importable
  sys.path.insert(0, ROOT)

from experiments import peft as peft_experiment  # pylint: disable=wrong-import-position
from research import parallelism, train  # pylint: disable=wrong-import-position
from research.training import partition  # pylint: disable=wrong-import-position


def _bytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="quickstart")
  parser.add_argument("--methods", default="full,lora,adalora,houlsby,prefix,bitfit")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--batch_index", type=int, default=0,
                      help="which training batch (fixes the width)")
  args = parser.parse_args()
  methods = args.methods.split(",")
  runs, steps, states, rows = {}, {}, {}, {}
  for m in methods:
    config = peft_experiment.get_config(f"task={args.task},method={m}")
    config.wandb.mode = "disabled"
    run = train.build(config)
    batch = parallelism.shard_batch(run.train_batches.batch_at(args.batch_index),
                                    run.batch_sharding)
    compiled = run.train_step.lower(run.state, run.frozen, batch, 0).compile()
    mem = compiled.memory_analysis()
    step_bytes = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                  + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    runs[m], steps[m], states[m] = (run, batch), compiled, run.state
    rows[m] = {"trainable": partition.count(run.state["params"]),
               "state_MB": _bytes(run.state) / 1e6,
               "frozen_MB": _bytes(run.frozen) / 1e6,
               "step_MB": step_bytes / 1e6, "times": []}
    states[m], _ = compiled(states[m], run.frozen, batch, 0)  # warm-up
    jax.block_until_ready(states[m])
  for r in range(args.rounds):
    for m in methods:
      run, batch = runs[m]
      t0 = time.perf_counter()
      states[m], metrics = steps[m](states[m], run.frozen, batch, r + 1)
      jax.block_until_ready((states[m], metrics))
      rows[m]["times"].append(time.perf_counter() - t0)
  base = statistics.median(rows[methods[0]]["times"])
  width = runs[methods[0]][1]["input_ids"].shape
  print(f"task {args.task}, batch {tuple(width)}, {args.rounds} alternated rounds; "
        f"ratio = median step / {methods[0]}'s")
  print("| method | trainable | median step (s) | ratio | step memory (MB) "
        "| trained state (MB) | frozen (MB) |")
  print("|---|---|---|---|---|---|---|")
  for m in methods:
    row = rows[m]
    med = statistics.median(row["times"])
    print(f"| {m} | {row['trainable']:,} | {med:.3f} | {med / base:.2f} | "
          f"{row['step_MB']:.0f} | {row['state_MB']:.1f} | {row['frozen_MB']:.1f} |")


if __name__ == "__main__":
  main()
