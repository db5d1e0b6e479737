r"""Which weights movement pruning removes at its first masks, against |W|.

    python benchmarks/movement_probe.py --arg data=quickstart,sparsity=0.5 --steps 16

Trains the first `--steps` updates of `experiments/compression.py`'s
movement-pruning run (`--arg`: its arg, method=movement added; its own
schedule) and
prints, after each update whose masks changed: the fraction of each target
layer pruned, the share of the pruned weights that lie in their layer's top
half by |W| before the update (magnitude pruning: 0; a random mask: 0.5),
the correlation of the scores S with |W|, and the training loss of that
update and of the next (the first under the new masks).
Movement pruning keeps the weights moving away from zero whatever their
size (Sanh et al. 2020); early in a fine-tuning run, before the weights
have moved, that choice is close to random in |W|, which a pre-trained
model does not survive (BENCHMARKS.md, "Compression").
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)


def probe(config, steps):
  """One row per update whose masks changed (see the module docstring)."""
  # pylint: disable=import-outside-toplevel
  from flax import nnx
  from research import parallelism, train
  run = train.build(config)
  state, rows = run.state, []
  flat = lambda s: {p: np.asarray(v[...])  # pylint: disable=unnecessary-lambda-assignment
                    for p, v in nnx.to_flat_state(s["params"])}
  before = flat(state)
  for step in range(steps):
    batch = parallelism.shard_batch(run.train_batches.batch_at(step),
                                    run.batch_sharding)
    state, metrics = run.train_step(state, run.frozen, batch, step)
    after = flat(state)
    pruned, large, corr, changed = [], [], [], False
    for path, scores in after.items():
      if path[-1] != "pruning_scores":
        continue
      layer = path[:-1]
      mask = after[layer + ("pruning_mask",)]
      changed |= bool((mask != before[layer + ("pruning_mask",)]).any())
      w = np.abs(before[layer + ("kernel",)])
      out = mask == 0
      pruned.append(out.mean())
      large.append((out & (w >= np.median(w))).sum() / max(out.sum(), 1))
      corr.append(np.corrcoef(scores.ravel(), w.ravel())[0, 1]
                  if scores.std() > 0 else np.nan)  # all S equal: undefined
    loss = float(np.asarray(metrics["loss"]))
    if rows and rows[-1]["update"] == step:  # the first loss under its masks
      rows[-1]["loss_after"] = loss
      _print(rows[-1])
    if changed:
      rows.append({"update": step + 1, "pruned": float(np.mean(pruned)),
                   "pruned_in_top_half": float(np.mean(large)),
                   "corr_scores_abs_w": float(np.nanmean(corr)),
                   "loss_before": loss, "loss_after": None})
    before = after
  if rows and rows[-1]["loss_after"] is None:
    _print(rows[-1])
  return rows


def _print(row):
  after = ("-" if row["loss_after"] is None else f"{row['loss_after']:.3f}")
  print(f"update {row['update']}: pruned {row['pruned']:.3f} of each layer; "
        f"of those, {row['pruned_in_top_half']:.3f} in the layer's top half "
        f"by |W|; corr(S, |W|) {row['corr_scores_abs_w']:.3f}; training loss "
        f"{row['loss_before']:.3f} at this update, {after} at the next",
        flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arg", default="data=quickstart,sparsity=0.5",
                      help="experiments/compression.py's arg (method=movement "
                      "is added)")
  parser.add_argument("--steps", type=int, default=16)
  args = parser.parse_args(argv)
  from experiments import compression  # pylint: disable=import-outside-toplevel
  return probe(compression.get_config(f"{args.arg},method=movement"),
               args.steps)


if __name__ == "__main__":
  main()
