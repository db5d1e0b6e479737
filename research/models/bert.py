"""The BERT encoder in Flax NNX (also RoBERTa, which differs only in details).

Post-LayerNorm transformer as in Devlin et al. (2018) and Hugging Face's
`BertModel`, so that Hugging Face checkpoints load onto it unchanged.

Every weight carries logical axis names only (`'vocab'`, `'embed'`, `'heads'`,
`'kv'`, `'mlp'`); which mesh axis each maps to is config, applied by
`research.parallelism`. Parameters are created unsharded (`eager_sharding=False`)
so the same model code runs on one device or a pod slice.

Dropout randomness is passed in per call (`rngs=nnx.Rngs(dropout=key)`); the
model holds no RNG state, so a training step is a pure function of
(params, batch, key) and resuming is exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Hugging Face `model_type`s whose weights this module reproduces exactly.
SUPPORTED_MODEL_TYPES = ("bert", "roberta")

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # BERT's erf GELU
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture hyperparameters, named as in Hugging Face's `config.json`."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  model_type: str = "bert"

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {self.model_type!r} is not supported; valid: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                       f"valid: {', '.join(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by "
          f"num_attention_heads {self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def position_offset(self) -> int:
    # RoBERTa numbers real tokens from pad_token_id + 1 (fairseq convention).
    return self.pad_token_id + 1 if self.model_type == "roberta" else 0

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
    """Builds from a `config.json` dict, ignoring fields BERT does not use."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})

  def replace(self, **kw) -> "BertConfig":
    return dataclasses.replace(self, **kw)


def _param(init, axes):
  """An initializer annotated with logical axis names (never eagerly sharded)."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def _dense(cfg, in_f, out_f, kernel_axes, *, dtype, param_dtype, rngs, axis=-1):
  """A Linear/LinearGeneral with BERT's N(0, 0.02) init and logical names."""
  init = nnx.initializers.normal(cfg.initializer_range)
  out_axes = kernel_axes[-1:] if isinstance(out_f, int) else kernel_axes[-len(out_f):]
  return nnx.LinearGeneral(
      in_f, out_f, axis=axis, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_param(init, kernel_axes),
      bias_init=_param(nnx.initializers.zeros, out_axes), rngs=rngs)


def _layer_norm(cfg, *, dtype, param_dtype, rngs):
  # use_fast_variance=False: E[(x - mean)^2] as PyTorch computes it, for parity.
  return nnx.LayerNorm(
      cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
      param_dtype=param_dtype, use_fast_variance=False,
      scale_init=_param(nnx.initializers.ones, ("embed",)),
      bias_init=_param(nnx.initializers.zeros, ("embed",)), rngs=rngs)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    embed = functools.partial(nnx.Embed, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    init = nnx.initializers.normal(cfg.initializer_range)
    self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size,
                                 embedding_init=_param(init, ("vocab", "embed")))
    self.position_embeddings = embed(
        cfg.max_position_embeddings, cfg.hidden_size,
        embedding_init=_param(init, (None, "embed")))
    self.token_type_embeddings = embed(
        cfg.type_vocab_size, cfg.hidden_size,
        embedding_init=_param(init, (None, "embed")))
    self.layer_norm = _layer_norm(cfg, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, position_ids, *, rngs=None):
    x = (self.word_embeddings(input_ids)
         + self.position_embeddings(position_ids)
         + self.token_type_embeddings(token_type_ids))
    x = self.layer_norm(x)
    return self.dropout(x, deterministic=rngs is None, rngs=rngs)


def attention(q, k, v, mask, *, dropout_rate=0.0, rngs=None, implementation=None):
  """Scaled dot-product attention with an exact boolean mask.

  Args:
    q, k, v: [batch, length, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, q_length, kv_length]; False
      entries get exactly zero probability.
    dropout_rate: dropout on the attention probabilities (BERT uses 0.1).
    rngs: an `nnx.Rngs` with a `dropout` stream; None means deterministic.
    implementation: passed to `jax.nn.dot_product_attention` ("xla", "cudnn"
      or None to let JAX choose).

  Returns:
    [batch, length, heads, head_dim].
  """
  if rngs is None or dropout_rate == 0.0:
    # The fused path (cuDNN flash attention on NVIDIA GPUs).
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                        implementation=implementation)
  # jax.nn.dot_product_attention has no dropout on the probabilities, so
  # training with attention dropout computes them explicitly. Set
  # config.model.attention_dropout=0 to train on the fused kernel.
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - dropout_rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with the output projection."""

  def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs,
               attention_impl=None):
    self.cfg = cfg
    self.attention_impl = attention_impl
    heads = (cfg.num_attention_heads, cfg.head_dim)
    dense = functools.partial(_dense, cfg, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    self.query = dense(cfg.hidden_size, heads, ("embed", "heads", "kv"))
    self.key = dense(cfg.hidden_size, heads, ("embed", "heads", "kv"))
    self.value = dense(cfg.hidden_size, heads, ("embed", "heads", "kv"))
    self.output = dense(heads, cfg.hidden_size, ("heads", "kv", "embed"),
                        axis=(-2, -1))

  def __call__(self, x, mask, *, rngs=None):
    q, k, v = self.query(x), self.key(x), self.value(x)  # [b, t, heads, kv]
    y = attention(q, k, v, mask, dropout_rate=self.cfg.attention_probs_dropout_prob,
                  rngs=rngs, implementation=self.attention_impl)
    return self.output(y)


class Layer(nnx.Module):
  """One post-LN transformer layer: attention, add & norm, MLP, add & norm."""

  def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs,
               attention_impl=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = SelfAttention(cfg, attention_impl=attention_impl, **kw)
    self.attention_layer_norm = _layer_norm(cfg, **kw)
    self.intermediate = _dense(cfg, cfg.hidden_size, cfg.intermediate_size,
                               ("embed", "mlp"), **kw)
    self.output = _dense(cfg, cfg.intermediate_size, cfg.hidden_size,
                         ("mlp", "embed"), **kw)
    self.output_layer_norm = _layer_norm(cfg, **kw)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
    self.activation = ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x, mask, *, rngs=None):
    drop = functools.partial(self.dropout, deterministic=rngs is None, rngs=rngs)
    x = self.attention_layer_norm(x + drop(self.attention(x, mask, rngs=rngs)))
    h = self.output(self.activation(self.intermediate(x)))
    return self.output_layer_norm(x + drop(h))


class BertModel(nnx.Module):
  """Embeddings, `num_hidden_layers` layers and the pooler (tanh on [CLS]).

  Call with int arrays `input_ids`, `attention_mask` (1 = real token) and
  optionally `token_type_ids`, `position_ids`, all [batch, length]. Returns
  `(sequence_output [batch, length, hidden], pooled_output [batch, hidden])`;
  `pooled_output` is None without a pooler (token-level heads, as in
  Hugging Face, have none).

  Packed rows (several examples back to back, `research.data.batching`):
  `segment_ids` [batch, length] (k = 1, 2, ... the row's k-th example, 0 =
  padding) makes attention block-diagonal (a token sees only its own
  example) and restarts the positions at each example; `example_starts`
  [batch, K] (each example's [CLS]) makes `pooled_output` [batch * K, hidden],
  row-major. An example gets the same outputs packed as alone.
  """

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl=None, remat=False,
               add_pooler=True, rngs: nnx.Rngs):
    self.cfg = cfg
    self.remat = remat
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = Embeddings(cfg, **kw)
    self.layers = nnx.List([Layer(cfg, attention_impl=attention_impl, **kw)
                            for _ in range(cfg.num_hidden_layers)])
    self.pooler = (_dense(cfg, cfg.hidden_size, cfg.hidden_size,
                          ("embed", None), **kw) if add_pooler else None)

  def position_ids(self, attention_mask, segment_ids=None):
    """Absolute positions; RoBERTa counts only real tokens, from pad_id + 1.

    With `segment_ids` the count restarts at each example of a packed row.
    """
    length = attention_mask.shape[-1]
    if segment_ids is None:
      if self.cfg.model_type == "roberta":
        return (jnp.cumsum(attention_mask, axis=-1) * attention_mask
                + self.cfg.pad_token_id)
      return jnp.broadcast_to(jnp.arange(length), attention_mask.shape)
    # An example starts where the segment id changes; a token's position is
    # its distance to the latest start.
    index = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
    change = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    within = index - jax.lax.cummax(jnp.where(change, index, 0), axis=1)
    if self.cfg.model_type == "roberta":
      return (within + 1) * attention_mask + self.cfg.pad_token_id
    return within

  def __call__(self, input_ids, attention_mask, token_type_ids=None,
               position_ids=None, *, segment_ids=None, example_starts=None,
               rngs=None):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = self.position_ids(attention_mask, segment_ids)
    x = self.embeddings(input_ids, token_type_ids, position_ids, rngs=rngs)
    if segment_ids is None:
      # [batch, 1, 1, kv_length]: every query may attend to every real key.
      mask = attention_mask.astype(bool)[:, None, None, :]
    else:
      # [batch, 1, q, kv]: block-diagonal; padding (segment 0) sees padding,
      # so that no row of the softmax is empty.
      mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    for layer in self.layers:
      if self.remat:
        x = nnx.remat(lambda lyr, h, m, r: lyr(h, m, rngs=r))(layer, x, mask, rngs)
      else:
        x = layer(x, mask, rngs=rngs)
    if self.pooler is None:
      return x, None
    if example_starts is None:
      first = x[:, 0]
    else:
      first = jnp.take_along_axis(x, example_starts[:, :, None], axis=1)
      first = first.reshape(-1, x.shape[-1])
    return x, jnp.tanh(self.pooler(first))
