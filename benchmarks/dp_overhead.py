"""Step-time overhead of DP-SGD's per-example gradients, measured side by side.

    python benchmarks/dp_overhead.py \
        --config experiments/dp_sgd.py:data=quickstart,epsilon=8 \
        --steps 12 --warmup 3 --repeats 2

`research.bench`'s table with two columns: the config's DP-SGD run ("ours
(JAX)") and, as its baseline, the same config without the dp_sgd method
(the same Poisson batches, model, optimiser and steps; one gradient of the
batch mean instead of per-example gradients clipped in chunks). The runs
alternate `--repeats` times; "speed-up" below 1 is the overhead (private /
non-private examples/s), and each repeat's ratio is listed under the table.
Not part of the library: `research.bench` takes any baseline as a function.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from research import bench  # pylint: disable=wrong-import-position


def non_private(config):
  """`config` without the dp_sgd method, with the same batches."""
  plain = config.copy_and_resolve_references()
  plain.methods = tuple(m for m in plain.methods if m != "dp_sgd")
  with plain.method_options.unlocked():
    plain.method_options.pop("dp_sgd", None)
  plain.data.sampler = "poisson"  # the private run's order and padded shape
  return plain


def make_baseline(config, warmup: int):
  """`bench.benchmark`'s baseline: the non-private twin of `config`."""
  plain = non_private(config)

  def run(_, steps):
    started = time.perf_counter()
    return bench.run_jax(bench.setup(plain), steps, warmup, evaluate=False,
                         started=started)
  return run


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if "dp_sgd" not in f.config.methods:
    print("error: the config's methods have no dp_sgd (e.g. "
          "experiments/dp_sgd.py:epsilon=8)", file=sys.stderr)
    sys.exit(2)
  print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average (1 min) at start "
        f"{os.getloadavg()[0]:.2f}, {len(os.sched_getaffinity(0))} cores; "
        "column 1: DP-SGD, column 2: the same run without privacy\n")
  bench.run_and_print(f, baseline=lambda: make_baseline(f.config, f.warmup))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=bench.parse_flags)
