r"""Per-example gradient norms against DP-SGD's clip norm, by class.

    python benchmarks/dp_grad_norms.py \
        --config experiments/dp_sgd.py:data=cola,data_dir=../shared/data/glue_cola,epsilon=8 \
        --examples 256 [--config.model.pooling=pooler]
    python benchmarks/dp_grad_norms.py --config ... --workdir RUN   # at a checkpoint

What clipping does to the update of a DP-SGD run (`config.methods` has
dp_sgd; its `clip_norm` C), measured on `--examples` training examples of
each class: each example's gradient norm before clipping (quantiles, the
fraction above C), and how clipping re-weights the classes. Unclipped, an
example contributes its whole gradient, so the examples a model gets wrong
(large losses, large gradients) weigh more; clipped to C, every clipped
example weighs the same. The table gives, per class, the norm of the
class's summed gradient before and after clipping (as a share of all
classes'), and the cosine between the clipped and the unclipped sum over
all classes (1: clipping keeps the direction). The model is the run's at
the start (`--workdir`: a checkpoint's, "best" or `--which latest`); no
noise is involved. Per-example gradients of every trained weight: minutes
on a CPU for a few hundred examples of the full model.

Not part of the library: it answers what clipping does (the "clipping
bias" question of issue 31); its table is not in BENCHMARKS.md yet.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _flat(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def class_sums(loss_fn, params, frozen, batcher, labels, clip_norm, limit,
               chunk):
  """{class: (clipped sum, unclipped sum, per-example norms)} over at most
  `limit` training examples of each class (in the split's order)."""
  import jax  # pylint: disable=import-outside-toplevel
  from research.methods.privacy import clipping  # pylint: disable=import-outside-toplevel

  def per_example(p, example, key):
    return loss_fn(p, frozen, example, key)[0]

  clipped = jax.jit(clipping.clip_and_sum(per_example, clip_norm=clip_norm,
                                          chunk_size=chunk))
  raw = jax.jit(clipping.clip_and_sum(per_example, clip_norm=1e30,
                                      chunk_size=chunk))
  key = jax.random.key(0)  # evaluation-like: dropout is off below
  out = {}
  for c in np.unique(labels):
    taken, sums_c, sums_r, norms = 0, 0.0, 0.0, []
    for step in range(batcher.steps_per_epoch):
      batch = dict(batcher.batch_at(step))
      rows = np.asarray(batch["weights"]) > 0
      keep = rows & (np.asarray(batch["labels"]) == c)
      keep &= np.cumsum(keep) <= limit - taken
      if not keep.any():
        if taken >= limit:
          break
        continue
      batch["weights"] = keep.astype(np.float32)
      g_clip, stats = clipped(params, batch, key)
      g_raw, _ = raw(params, batch, key)
      sums_c = sums_c + _flat(g_clip)
      sums_r = sums_r + _flat(g_raw)
      norms += list(np.asarray(stats["grad_norms"])[keep])
      taken += int(keep.sum())
      if taken >= limit:
        break
    out[int(c)] = (sums_c, sums_r, np.asarray(norms))
  return out


def report(sums, clip_norm, label_names=()):
  """The table of `class_sums`."""
  names = {c: (label_names[c] if c < len(label_names) else str(c))
           for c in sums}
  total_c = sum(s[0] for s in sums.values())
  total_r = sum(s[1] for s in sums.values())
  share_c = {c: np.linalg.norm(s[0]) for c, s in sums.items()}
  share_r = {c: np.linalg.norm(s[1]) for c, s in sums.items()}
  lines = [f"clip norm C = {clip_norm:g}", "",
           "| class | examples | norm p10 / p50 / p90 | max | above C | "
           "|sum| unclipped (share) | |sum| clipped (share) |",
           "|---|---|---|---|---|---|---|"]
  for c, (_, _, norms) in sums.items():
    q = np.percentile(norms, [10, 50, 90])
    lines.append(
        f"| {names[c]} | {len(norms)} | {q[0]:.3g} / {q[1]:.3g} / {q[2]:.3g} "
        f"| {norms.max():.3g} | {np.mean(norms > clip_norm):.3f} | "
        f"{share_r[c]:.4g} ({share_r[c] / sum(share_r.values()):.3f}) | "
        f"{share_c[c]:.4g} ({share_c[c] / sum(share_c.values()):.3f}) |")
  cosine = float(total_c @ total_r / (np.linalg.norm(total_c)
                                      * np.linalg.norm(total_r) + 1e-30))
  lines += ["", f"cosine(clipped sum, unclipped sum) over all classes: "
            f"{cosine:.4f}"]
  for c, (s_c, s_r, _) in sums.items():
    cos = float(s_c @ total_r / (np.linalg.norm(s_c) * np.linalg.norm(total_r)
                                 + 1e-30))
    lines.append(f"cosine(class {names[c]}'s clipped sum, unclipped total): "
                 f"{cos:.4f}")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from research import data, train  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  config = f.config
  options = config.method_options.get("dp_sgd")
  if options is None:
    print("error: the config has no dp_sgd method (e.g. "
          "experiments/dp_sgd.py:...,epsilon=8)", file=sys.stderr)
    sys.exit(2)
  clip_norm = float(options.clip_norm)
  # No dropout: the norms of the model, not of one dropout draw.
  config.model.hidden_dropout = config.model.attention_dropout = 0.0
  started = time.time()
  run = train.build(config)
  params, frozen, graphdef = run.state["params"], run.frozen, run.graphdef
  if f.workdir:
    from research import restore  # pylint: disable=import-outside-toplevel
    restored = restore.restore_run(f.workdir, f.which)
    params, frozen, graphdef = (restored.params, restored.frozen,
                                restored.graphdef)
    print(f"{f.workdir}: step {restored.step} ({restored.which})")
  split = run.train_split
  # One padded width: one compilation of each gradient function.
  batcher = data.Batcher(split, 8 * f.chunk, (config.data.max_length,),
                         shuffle=False)
  labels = np.concatenate([
      np.asarray(b["labels"])[np.asarray(b["weights"]) > 0]
      for b in (batcher.batch_at(s) for s in range(batcher.steps_per_epoch))])
  print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average "
        f"{os.getloadavg()[0]:.1f}; pooling "
        f"{getattr(run.context.model.bert, 'pooling', None)}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  sums = class_sums(run.task.loss_fn(graphdef), params, frozen, batcher,
                    labels, clip_norm, f.examples, f.chunk)
  print(report(sums, clip_norm, tuple(run.label_names)))
  print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
  from absl import app, flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "an experiment with the dp_sgd method, e.g. "
      "experiments/dp_sgd.py:data=cola,...,epsilon=8", lock_config=True)
  absl_flags.DEFINE_string("workdir", "", "a run whose checkpoint to measure "
                           "(default: the model at the start)")
  absl_flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint")
  absl_flags.DEFINE_integer("examples", 256, "training examples per class")
  absl_flags.DEFINE_integer("chunk", 8, "per-example gradients at once")
  absl_flags.mark_flags_as_required(["config"])
  app.run(main)
