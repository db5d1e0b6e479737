"""Elastic weight consolidation: keep the weights that mattered to old data.

Kirkpatrick et al. (2017), "Overcoming catastrophic forgetting in neural
networks": the loss gets

    weight / 2 * sum_i F_i (w_i - w0_i)^2

with `w0` the weights the run started from (as `l2_sp`) and `F` the
diagonal of the (empirical) Fisher information at `w0` on the *old* data:
the mean over its examples of each weight's squared per-example gradient
of the loss at the true label. Weights the old data's loss is sensitive to
are held near `w0`; the rest are free to learn the new data.

    config.methods = ("ewc",)
    config.method_options.ewc = dict(
        weight=1.0, fisher_file="old_examples.tsv", fisher_examples=1000)

Options:
  weight           lambda.
  fisher_file      examples of the earlier data, in config.data's format
                   (`research.continual` passes its replay buffer: a
                   uniform sample of everything trained on before).
  fisher_examples  the most examples read from it (its first ones).
  fisher_batch_size  examples per jitted batch of per-example gradients;
                   chunk_size: how many of them are held at once (0: all).
  normalize        divide F by its mean over all weights, so that `weight`
                   means the same on any model and data (a mean precision
                   of 1, as L2-SP's); False keeps the raw Fisher.

The per-example gradients come from DP-SGD's machinery
(`research.methods.privacy.clipping.squared_sum`: jax-privacy's
`clipped_grad`, unclipped, squared before the sum). The Fisher is computed
once in `setup`, without dropout, and travels in `frozen.methods["ewc"]`
beside the starting weights (never checkpointed: a resumed run recomputes
the same values from the same start and file).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.configs.plugins import ConfigError
from research.data import batching, splits
from research.methods import l2_sp
from research.methods.privacy import clipping
from research.training import partition

WHERE = "config.method_options.ewc"


def fisher_diagonal(task, graphdef, params, frozen, split, batch_size,
                    chunk_size=None, seed=0, buckets=()):
  """The empirical Fisher diagonal: mean over `split`'s examples of the
  squared per-example gradient of the task's loss, at `params`.

  Args:
    task: the run's task (its forward without dropout, loss, transform).
    graphdef, params, frozen: the model split as the run trains it
      (`params` are the weights differentiated).
    split: a labelled `TokenizedSplit`.
    batch_size: examples per jitted batch; chunk_size: held at once.
    seed: the transform's key (masked-LM masking), if any.
    buckets: padded lengths (the run's data.buckets; one compilation
      each); empty: the split's longest example, one shape.

  Returns:
    A tree like `params` (float32).
  """
  def per_example(trainable, example, key):
    if task.transform is not None:
      example = task.transform(example, key)
    model = partition.merge(graphdef, trainable, frozen)
    losses, weights = task.loss(task.forward(model, example), example)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)

  sums = jax.jit(clipping.squared_sum(per_example, chunk_size=chunk_size))
  # Few shapes: each is a compilation of a per-example backward pass.
  batcher = batching.Batcher(split, batch_size,
                             tuple(buckets) or (int(split.lengths.max()),),
                             shuffle=False)
  total, count = None, 0.0
  for i, batch in enumerate(batcher.eval_batches()):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    part, n = sums(params, batch, jax.random.fold_in(jax.random.key(seed), i))
    total = part if total is None else jax.tree.map(jnp.add, total, part)
    count += float(n)
  return jax.tree.map(lambda x: x.astype(jnp.float32) / max(count, 1.0),
                      total)


class Method(l2_sp.Method):
  """See the module docstring."""
  CONFIG = {"weight": 1.0, "fisher_file": "", "fisher_examples": 1000,
            "fisher_batch_size": 32, "chunk_size": 0, "normalize": True}

  def __init__(self, config, **options):
    super().__init__(config, **options)
    o = self.options
    if not o["fisher_file"]:
      raise ConfigError(
          f"{WHERE}.fisher_file is empty: a file of the earlier data (in "
          "config.data's format) to estimate the Fisher information on; "
          "research.continual passes its replay buffer")
    for field in ("fisher_examples", "fisher_batch_size"):
      if o[field] < 1:
        raise ConfigError(f"{WHERE}.{field}={o[field]!r} must be >= 1")
    if o["chunk_size"] < 0 or (o["chunk_size"]
                               and o["fisher_batch_size"] % o["chunk_size"]):
      raise ConfigError(f"{WHERE}.chunk_size={o['chunk_size']!r} must be 0 "
                        "or divide fisher_batch_size="
                        f"{o['fisher_batch_size']}")

  def setup(self, context):
    state = super().setup(context)
    if not context.training:
      return None  # export, prediction and serving need neither
    o = self.options
    split = splits.load_file(
        context.config, context.tokenizer, context.task, o["fisher_file"],
        "fisher", list(context.label_names), where=f"{WHERE}.fisher_file")
    split = split.head(o["fisher_examples"])
    fisher = fisher_diagonal(
        context.task, context.graphdef, context.params, context.frozen, split,
        o["fisher_batch_size"], o["chunk_size"] or None,
        seed=context.config.seed, buckets=context.config.data.buckets)
    if o["normalize"]:
      leaves = jax.tree.leaves(fisher)
      mean = sum(float(x.sum()) for x in leaves) / sum(x.size for x in leaves)
      fisher = jax.tree.map(lambda x: x / max(mean, 1e-30), fisher)
    return {**state, "fisher": fisher}

  def precision(self, state):
    return state["fisher"]
