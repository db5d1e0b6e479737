"""L2-SP: fine-tune near the weights the run started from.

Li, Grandvalet and Davoine (2018), "Explicit Inductive Bias for Transfer
Learning with Convolutional Networks": instead of weight decay towards 0,
the loss gets

    weight / 2 * sum_i (w_i - w0_i)^2

over the trained weights `w`, with `w0` their values when the run started
(the pre-trained model, or in continual learning the deployed one: a
`research.continual` round starts from the current version). Weights the
start did not have (a freshly initialised head) are pulled towards their
initialisation; the paper's separate L2 on new layers is
`config.optimizer.weight_decay`.

    config.methods = ("l2_sp",)
    config.method_options.l2_sp = dict(weight=0.1)

The starting weights are the method's state (`Method.setup`): a copy of the
loaded trainable weights, sharded like them, never checkpointed (a resumed
run loads the same start again). `research/methods/ewc.py` weighs each
weight's pull by its Fisher information instead of 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research import methods
from research.configs.plugins import ConfigError


def penalty(params, anchor, precision=None):
  """sum_i precision_i (w_i - w0_i)^2 over matching leaves (float32)."""
  leaves = jax.tree.leaves(params)
  anchors = jax.tree.leaves(anchor)
  weights = jax.tree.leaves(precision) if precision is not None else \
      [None] * len(leaves)
  total = jnp.float32(0.0)
  for w, w0, f in zip(leaves, anchors, weights, strict=True):
    sq = jnp.square(w.astype(jnp.float32) - w0.astype(jnp.float32))
    total += jnp.sum(sq if f is None else f.astype(jnp.float32) * sq)
  return total


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = {"weight": 0.01}

  def __init__(self, config, **options):
    super().__init__(config, **options)
    if self.options["weight"] < 0:
      raise ConfigError(f"config.method_options.{self.name}.weight="
                        f"{self.options['weight']!r} must be >= 0")

  def setup(self, context):
    # A copy: the trainable weights are donated to the update step.
    return {"anchor": jax.tree.map(jnp.array, context.params)}

  def precision(self, state):
    """Each weight's pull towards its start (None: 1 for every weight)."""
    del state

  def wrap_loss(self, loss_fn):
    weight, name = self.options["weight"], self.name

    def fn(params, frozen, batch, key):
      loss, aux = loss_fn(params, frozen, batch, key)
      state = frozen.methods[name]
      pull = penalty(params, state["anchor"], self.precision(state))
      return loss + 0.5 * weight * pull, aux

    return fn
