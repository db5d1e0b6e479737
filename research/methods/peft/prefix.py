"""Prefix tuning's trained keys and values (Li & Liang 2021).

`PrefixEncoder` holds, for every layer, `length` key and value vectors per
head that every token attends to before the sequence's own (the model's
`prefix_kv` hook: set as `BertModel.prefix_encoder`, it is called on every
forward pass). With `projection=True` they are re-parameterised as in the
paper and PEFT's `prefix_projection`: an embedding [length, hidden] through
an MLP (hidden -> projection_size -> layers * 2 * hidden, tanh), which
steadies training; `fold()` then replaces the MLP by its output for
inference.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class PrefixParam(nnx.Param):
  """Prefix tuning's weights (trained; selected by type)."""


class PrefixEncoder(nnx.Module):
  """Per-layer key/value prefixes: `() -> [layers, 2, 1, length, heads, head_dim]`."""

  def __init__(self, cfg, length: int, *, projection: bool = False,
               projection_size: int = 512, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.shape = (cfg.num_hidden_layers, 2, cfg.num_attention_heads,
                  cfg.head_dim)
    self.length = length
    init = nnx.initializers.normal(cfg.initializer_range)
    p = lambda shape: PrefixParam(init(rngs.params(), shape, param_dtype))  # pylint: disable=unnecessary-lambda-assignment
    out = cfg.num_hidden_layers * 2 * cfg.hidden_size
    if projection:
      self.embedding = p((length, cfg.hidden_size))
      self.hidden = p((cfg.hidden_size, projection_size))
      self.hidden_bias = PrefixParam(jnp.zeros((projection_size,), param_dtype))
      self.output = p((projection_size, out))
      self.output_bias = PrefixParam(jnp.zeros((out,), param_dtype))
    else:
      self.prefix = p((length, out))

  def fold(self):
    """Replaces the MLP by the prefixes it computes now (inference)."""
    if hasattr(self, "embedding"):
      value = self.flat()
      for name in ("embedding", "hidden", "hidden_bias", "output", "output_bias"):
        delattr(self, name)
      self.prefix = PrefixParam(value)

  def flat(self):
    """The prefixes [length, layers * 2 * hidden]."""
    if hasattr(self, "prefix"):
      return self.prefix[...]
    h = jnp.tanh(self.embedding[...] @ self.hidden[...] + self.hidden_bias[...])
    return h @ self.output[...] + self.output_bias[...]

  def __call__(self, rngs=None):
    del rngs  # no dropout on the prefixes
    layers, two, heads, head_dim = self.shape
    x = self.flat().reshape(self.length, layers, two, heads, head_dim)
    return x.transpose(1, 2, 0, 3, 4)[:, :, None]  # [layers, 2, 1, length, h, d]
