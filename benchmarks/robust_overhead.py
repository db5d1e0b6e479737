r"""Step-time overhead of adversarial training and augmentation vs plain training.

    python benchmarks/robust_overhead.py --data quickstart --steps 30 --repeats 2

Builds each method's run of `experiments/robust.py` (`research.bench.setup`,
the trainer's own step) and times `--steps` updates (the first `--warmup`
left out), the methods alternating within each repeat so that a busy host
slows them alike; prints the median step time of each and its ratio to
plain training. Every method trains on the same batches (same seed).
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)

from experiments import robust  # pylint: disable=wrong-import-position
from research import bench  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default="quickstart", choices=robust.DATA)
  parser.add_argument("--methods", default="plain,fgm,pgd,freelb,augment")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  methods = args.methods.split(",")
  times = {m: [] for m in methods}
  for _ in range(args.repeats):
    for method in methods:
      config = robust.get_config(f"data={args.data},method={method}")
      raw = bench.run_jax(bench.setup(config), args.steps, args.warmup,
                          evaluate=False, cost_analysis=False)
      times[method].append(bench.summarize(raw)["step_ms_median"])
      print(method, f"{times[method][-1]:.1f} ms", flush=True)
  base = times[methods[0]]
  rows = {m: {"step_ms_median": float(np.median(t)),
              "ratio_per_repeat": [a / b for a, b in zip(t, base)]}
          for m, t in times.items()}
  for m, row in rows.items():
    print(f"| {m} | {row['step_ms_median']:.1f} | "
          f"{np.median(row['ratio_per_repeat']):.2f}x "
          f"({', '.join(f'{r:.2f}' for r in row['ratio_per_repeat'])}) |")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
