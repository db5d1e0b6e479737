"""The BERT encoder in Flax NNX (also RoBERTa, which differs only in details).

Post-LayerNorm transformer as in Devlin et al. (2018) and Hugging Face's
`BertModel`, so that Hugging Face checkpoints load onto it unchanged. Two
options for models trained from scratch (`BertConfig.pre_layer_norm`,
`use_bias`; Cramming, Geiping & Goldstein 2023): LayerNorm before each
sub-layer, with a final one after the last layer (Xiong et al. 2020), which
trains stably at the high learning rates that leave a post-LN BERT at the
unigram plateau; and encoder dense layers without biases. Hugging Face's
`BertModel` has neither: `research.models.hf.export` refuses a pre-LN model
and writes zero biases for a bias-free one.

Every weight carries logical axis names only (`'vocab'`, `'embed'`, `'heads'`,
`'kv'`, `'mlp'`); which mesh axis each maps to is config, applied by
`research.parallelism`. Parameters are created unsharded (`eager_sharding=False`)
so the same model code runs on one device or a pod slice.

Dropout randomness is passed in per call (`rngs=nnx.Rngs(dropout=key)`); the
model holds no RNG state, so a training step is a pure function of
(params, batch, key) and resuming is exact.

Hooks for methods that change the network without forking it:
- `dense_factory`: every Linear of the encoder and the heads is built by one
  function (default `make_dense`); LoRA, quantised or pruned layers replace it.
- `inputs_embeds`: word embeddings in place of token ids (attributions,
  adversarial training, prompt tuning).
- `prefix_kv`: per-layer keys and values prepended in attention (prefix
  tuning); a module set as `BertModel.prefix_encoder` (called with `rngs`)
  supplies them when the call gives none.
- `prune_heads({layer: heads})`: attention heads removed, their matmul
  slices cut (structured pruning; config.json's `pruned_heads`).
- `sow_attention=True`: each `SelfAttention` sows its probabilities as
  `nnx.Intermediate` `attention_probs`; read them with `nnx.capture` and
  `stack_attention` (the fused kernel, the default, has no probabilities).

Each class also carries its Hugging Face weight names (`hf_key_map`), which
`research.models.hf` reads to import and export checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import pooling as pooling_lib

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
  # Not in Hugging Face's BERT (see the module docstring).
  pre_layer_norm: bool = False  # LayerNorm before each sub-layer + a final one
  use_bias: bool = True         # biases of the encoder's dense layers

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
  def dense_options(self) -> dict:
    """Extra `dense_factory` arguments of the encoder's layers (none by
    default, so that a factory with a fixed signature keeps working)."""
    return {} if self.use_bias else {"use_bias": False}

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


def make_dense(in_features, out_features, *, kernel_axes, name: str,
               axis=-1, stddev: float = 0.02, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs,
               layer=nnx.LinearGeneral, **layer_options) -> nnx.Module:
  """The default dense layer: an `nnx.LinearGeneral` with logical axis names.

  Every Linear of the encoder and the heads is built through a function with
  this signature (the `dense_factory` argument of `BertModel` and the heads),
  so a method that changes dense layers (LoRA, quantisation, pruning masks)
  passes its own factory instead of forking the model. A factory usually
  wraps this one and may choose by `name`. To keep Hugging Face import and
  export working, the layer keeps its weights at `kernel` and `bias` with the
  shapes below; added variables are reported as newly initialised on load
  when they are `nnx.Param`s, and ignored when they are another type. Export
  writes `kernel` and `bias` only (merge a low-rank update into the kernel
  first).

  Args:
    in_features: input size, or a tuple of sizes with `axis` (e.g. the
      attention output's (heads, head_dim)).
    out_features: output size, or a tuple (e.g. (heads, head_dim)).
    kernel_axes: logical axis names of the kernel, inputs then outputs; the
      bias takes the output names.
    name: the layer's place in its block, e.g. "attention.query",
      "attention.output", "intermediate", "output", "pooler", "classifier".
    axis: the input axes contracted.
    stddev: the kernel's normal initialiser scale (`initializer_range`).
    dtype, param_dtype: compute and parameter dtypes.
    rngs: initialisation randomness.
    layer: the class built (a subclass of `nnx.LinearGeneral` that adds
      weights, e.g. `research.methods.peft.layers.LoRADense`), with
      `layer_options` as its extra keyword arguments.

  Returns:
    A module called as `layer(x)`.
  """
  del name  # the default layer is the same everywhere
  init = nnx.initializers.normal(stddev)
  out_axes = (kernel_axes[-1:] if isinstance(out_features, int)
              else kernel_axes[-len(out_features):])
  return layer(
      in_features, out_features, axis=axis, dtype=dtype,
      param_dtype=param_dtype, kernel_init=_param(init, kernel_axes),
      bias_init=_param(nnx.initializers.zeros, out_axes), rngs=rngs,
      **layer_options)


DenseFactory = Callable[..., nnx.Module]  # make_dense's signature


def dense_builder(cfg: BertConfig, dense_factory: DenseFactory, *, dtype,
                  param_dtype, rngs) -> Callable[..., nnx.Module]:
  """`dense_factory` with the settings every layer of a model shares bound."""
  return functools.partial(dense_factory, stddev=cfg.initializer_range,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _layer_norm(cfg, *, dtype, param_dtype, rngs):
  # use_fast_variance=False: E[(x - mean)^2] as PyTorch computes it, for parity.
  return nnx.LayerNorm(
      cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
      param_dtype=param_dtype, use_fast_variance=False,
      scale_init=_param(nnx.initializers.ones, ("embed",)),
      bias_init=_param(nnx.initializers.zeros, ("embed",)), rngs=rngs)


# Hugging Face names: hf_key -> (path in nnx.state(model, nnx.Param), kind).
# `kind` says how a PyTorch tensor becomes ours (research.models.hf converts):
# "copy"; "linear" ([out, in] there, [in, out] here); "qkv_kernel",
# "qkv_bias", "out_kernel" (attention weights split into (heads, head_dim)).
HfKeyMap = dict[str, tuple[tuple, str]]


def hf_linear_keys(hf: str, ours: tuple) -> HfKeyMap:
  """A PyTorch `nn.Linear` named `hf` onto our dense layer at `ours`."""
  return {f"{hf}.weight": (ours + ("kernel",), "linear"),
          f"{hf}.bias": (ours + ("bias",), "copy")}


def hf_layer_norm_keys(hf: str, ours: tuple) -> HfKeyMap:
  """A PyTorch `nn.LayerNorm` named `hf` onto our LayerNorm at `ours`."""
  return {f"{hf}.weight": (ours + ("scale",), "copy"),
          f"{hf}.bias": (ours + ("bias",), "copy")}


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

  def __call__(self, input_ids, token_type_ids, position_ids, *,
               inputs_embeds=None, rngs=None):
    """`inputs_embeds` [batch, length, hidden], when given, replaces the
    word-embedding lookup of `input_ids` (which may then be None)."""
    if inputs_embeds is None:
      inputs_embeds = self.word_embeddings(input_ids)
    x = (inputs_embeds
         + self.position_embeddings(position_ids)
         + self.token_type_embeddings(token_type_ids))
    x = self.layer_norm(x)
    return self.dropout(x, deterministic=rngs is None, rngs=rngs)


def attention(q, k, v, mask, *, dropout_rate=0.0, rngs=None, implementation=None,
              return_probs=False):
  """Scaled dot-product attention with an exact boolean mask.

  Args:
    q: [batch, q_length, heads, head_dim].
    k, v: [batch, kv_length, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, q_length, kv_length]; False
      entries get exactly zero probability.
    dropout_rate: dropout on the attention probabilities (BERT uses 0.1).
    rngs: an `nnx.Rngs` with a `dropout` stream; None means deterministic.
    implementation: passed to `jax.nn.dot_product_attention` ("xla", "cudnn"
      or None to let JAX choose).
    return_probs: also return the probabilities (before dropout); takes the
      explicit softmax path.

  Returns:
    [batch, q_length, heads, head_dim]; with `return_probs`, also the float32
    probabilities [batch, heads, q_length, kv_length].
  """
  dropout = rngs is not None and dropout_rate != 0.0
  if not (dropout or return_probs):
    # The fused path (cuDNN flash attention on NVIDIA GPUs).
    if implementation == "cudnn" and mask.shape[1] == mask.shape[2] == 1:
      # cuDNN takes a mask only as a full [b, h, q, k] bias (it refused our
      # [b, 1, 1, k] on an H200); a padding mask is a length per row
      # instead. Rows are right-padded (prefix keys, then tokens, then
      # padding), so the length is the count of visible keys.
      lengths = mask[:, 0, 0, :].sum(-1).astype(jnp.int32)
      return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                          implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                        implementation=implementation)
  # jax.nn.dot_product_attention has no dropout on the probabilities and does
  # not return them, so training with attention dropout (and recording the
  # probabilities) computes them explicitly. Set
  # config.model.attention_dropout=0 to train on the fused kernel.
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  weights = probs
  if dropout:
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - dropout_rate, probs.shape)
    weights = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
  return (y, probs) if return_probs else y


class SelfAttention(nnx.Module):
  """Multi-head self-attention with the output projection."""

  def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs,
               attention_impl=None, dense_factory: DenseFactory = make_dense):
    self.cfg = cfg
    self.attention_impl = attention_impl
    heads = (cfg.num_attention_heads, cfg.head_dim)
    dense = dense_builder(cfg, dense_factory, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    qkv_axes = ("embed", "heads", "kv")
    opts = cfg.dense_options
    self.query = dense(cfg.hidden_size, heads, kernel_axes=qkv_axes,
                       name="attention.query", **opts)
    self.key = dense(cfg.hidden_size, heads, kernel_axes=qkv_axes,
                     name="attention.key", **opts)
    self.value = dense(cfg.hidden_size, heads, kernel_axes=qkv_axes,
                       name="attention.value", **opts)
    self.output = dense(heads, cfg.hidden_size, axis=(-2, -1),
                        kernel_axes=("heads", "kv", "embed"),
                        name="attention.output", **opts)
    # Original indices of the heads `prune_heads` removed.
    self.pruned_heads: tuple[int, ...] = ()

  def prune_heads(self, heads) -> None:
    """Removes heads (original indices) from Q, K, V and the output projection.

    The kernels lose those heads' slices, so every matmul of the layer
    shrinks (Michel et al. 2019; Hugging Face's `prune_heads`). Heads pruned
    before are skipped. Only plain dense layers (`kernel` and `bias`) can be
    cut: a layer with weights of its own (LoRA, a pruning mask) raises.

    Raises:
      ValueError: a head index out of range, or every head of the layer.
    """
    n = self.cfg.num_attention_heads
    heads = set(int(h) for h in heads)
    if any(not 0 <= h < n for h in heads):
      raise ValueError(f"head indices {sorted(heads)}: valid are 0..{n - 1}")
    remaining = [h for h in range(n) if h not in self.pruned_heads]
    keep = [i for i, h in enumerate(remaining) if h not in heads]
    if not keep:
      raise ValueError(f"pruning heads {sorted(heads)} would remove all {n} "
                       "heads of the layer; keep at least one")
    if len(keep) == len(remaining):
      return
    keep = jnp.asarray(keep)
    for name in ("query", "key", "value", "output"):
      layer = getattr(self, name)
      params = set(dict(nnx.to_flat_state(nnx.state(layer, nnx.Param))))
      if params != {("kernel",), ("bias",)}:
        raise ValueError(
            f"attention.{name} is a {type(layer).__name__} with weights "
            f"{sorted('/'.join(map(str, p)) for p in params)}: only plain "
            "dense layers (kernel, bias) can lose heads")
      if name == "output":  # kernel [heads, kv, embed]; in_features (heads, kv)
        layer.kernel.set_value(layer.kernel[...][keep])
        layer.in_features = (len(keep),) + tuple(layer.in_features[1:])
      else:  # kernel [embed, heads, kv]; bias and out_features (heads, kv)
        layer.kernel.set_value(layer.kernel[...][:, keep])
        layer.bias.set_value(layer.bias[...][keep])
        layer.out_features = (len(keep),) + tuple(layer.out_features[1:])
    self.pruned_heads = tuple(sorted(set(self.pruned_heads) | heads))

  def __call__(self, x, mask, *, prefix=None, sow_attention=False, rngs=None):
    """Attends over `prefix` keys/values (when given) and the tokens.

    Args:
      x: [batch, length, hidden].
      mask: bool, broadcastable to [batch, 1, length, prefix_len + length].
      prefix: None or (key, value), each [batch (or 1), prefix_len, heads,
        head_dim], placed before the tokens' own keys and values.
      sow_attention: sow the probabilities [batch, heads, length,
        prefix_len + length] as `nnx.Intermediate` "attention_probs".
      rngs: dropout randomness; None = evaluation.
    """
    q, k, v = self.query(x), self.key(x), self.value(x)  # [b, t, heads, kv]
    if prefix is not None:
      k, v = (jnp.concatenate([jnp.broadcast_to(
          p, (a.shape[0],) + p.shape[-3:]).astype(a.dtype), a], axis=1)
              for p, a in zip(prefix, (k, v)))
    y = attention(q, k, v, mask, dropout_rate=self.cfg.attention_probs_dropout_prob,
                  rngs=rngs, implementation=self.attention_impl,
                  return_probs=sow_attention)
    if sow_attention:
      y, probs = y
      self.sow(nnx.Intermediate, "attention_probs", probs)
    return self.output(y)


def stack_attention(intermediates: nnx.State) -> jax.Array:
  """Sown attention probabilities, stacked in layer order.

  Args:
    intermediates: the `nnx.Intermediate` state captured from a call with
      `sow_attention=True`, e.g.
      `_, sown = nnx.capture(model, nnx.Intermediate)(..., sow_attention=True)`
      (works under `nnx.jit` and `nnx.remat`). Outside `nnx.capture`, flax
      0.12 stores the values on the model with a DeprecationWarning;
      `nnx.pop(model, nnx.Intermediate)` then returns them.

  Returns:
    float32 [layers, batch, heads, q_length, kv_length].
  """
  found = []
  for path, value in nnx.to_flat_state(intermediates):
    if path[-1] == "attention_probs":
      layer = path[path.index("layers") + 1]
      found.extend((layer, p) for p in value.get_value())
  if not found:
    raise ValueError("no attention probabilities were sown: call the model "
                     "with sow_attention=True inside nnx.capture(..., "
                     "nnx.Intermediate)")
  return jnp.stack([p for _, p in sorted(found, key=lambda lp: lp[0])])


class Layer(nnx.Module):
  """One transformer layer: attention, add & norm, MLP, add & norm (post-LN).

  With `cfg.pre_layer_norm`: x + attention(norm(x)), then x + MLP(norm(x));
  the two LayerNorms keep their names (`attention_layer_norm` normalises the
  attention's input, `output_layer_norm` the MLP's).
  """

  def __init__(self, cfg: BertConfig, *, dtype, param_dtype, rngs,
               attention_impl=None, dense_factory: DenseFactory = make_dense):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dense = dense_builder(cfg, dense_factory, **kw)
    self.attention = SelfAttention(cfg, attention_impl=attention_impl,
                                   dense_factory=dense_factory, **kw)
    self.attention_layer_norm = _layer_norm(cfg, **kw)
    self.intermediate = dense(cfg.hidden_size, cfg.intermediate_size,
                              kernel_axes=("embed", "mlp"), name="intermediate",
                              **cfg.dense_options)
    self.output = dense(cfg.intermediate_size, cfg.hidden_size,
                        kernel_axes=("mlp", "embed"), name="output",
                        **cfg.dense_options)
    self.output_layer_norm = _layer_norm(cfg, **kw)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
    self.activation = ACTIVATIONS[cfg.hidden_act]
    self.pre_layer_norm = cfg.pre_layer_norm

  def __call__(self, x, mask, *, prefix=None, sow_attention=False, rngs=None):
    drop = functools.partial(self.dropout, deterministic=rngs is None, rngs=rngs)
    attend = functools.partial(self.attention, mask=mask, prefix=prefix,
                               sow_attention=sow_attention, rngs=rngs)
    mlp = lambda h: self.output(self.activation(self.intermediate(h)))  # pylint: disable=unnecessary-lambda-assignment
    if self.pre_layer_norm:
      x = x + drop(attend(self.attention_layer_norm(x)))
      return x + drop(mlp(self.output_layer_norm(x)))
    x = self.attention_layer_norm(x + drop(attend(x)))
    return self.output_layer_norm(x + drop(mlp(x)))


def _layer_keys(rngs, count):
  """One dropout key per layer, `fold_in(k, i)` of one draw `k`: the same in
  the unrolled loop and the scan, so both give the same dropout masks."""
  if rngs is None:
    return [None] * count
  base = rngs.dropout()
  return [jax.random.fold_in(base, i) for i in range(count)]


def _call_layer(layer, x, mask, prefix, key, sow_attention):
  return layer(x, mask, prefix=prefix, sow_attention=sow_attention,
               rngs=None if key is None else nnx.Rngs(dropout=key))


class BertModel(nnx.Module):
  """Embeddings, `num_hidden_layers` layers and a sentence pooling.

  Call with int arrays `input_ids`, `attention_mask` (1 = real token) and
  optionally `token_type_ids`, `position_ids`, all [batch, length]. Returns
  `(sequence_output [batch, length, hidden], pooled_output [batch, hidden])`.
  `pooling` (`research.models.pooling`) makes `pooled_output`: "pooler"
  (BERT's dense + tanh on [CLS], the only one with weights), "cls", "mean"
  or "max" over the real tokens; None gives no `pooled_output` (token-level
  heads, which in Hugging Face have no pooler either).

  Packed rows (several examples back to back, `research.data.batching`):
  `segment_ids` [batch, length] (k = 1, 2, ... the row's k-th example, 0 =
  padding) makes attention block-diagonal (a token sees only its own
  example) and restarts the positions at each example; `example_starts`
  [batch, K] (each example's [CLS]) makes `pooled_output` [batch * K, hidden],
  row-major, each example pooled over its own tokens. An example gets the
  same outputs packed as alone.

  Hooks (see the module docstring): `inputs_embeds`, `prefix_kv`,
  `sow_attention` in the call, `dense_factory` in the constructor.
  """
  # Keys in Hugging Face files that are buffers, not weights.
  hf_ignored = ("embeddings.position_ids",)

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl=None, remat=False,
               scan_layers=False, pooling: str | None = "pooler",
               dense_factory: DenseFactory = make_dense, rngs: nnx.Rngs):
    if pooling is not None and pooling not in pooling_lib.POOLINGS:
      raise ValueError(f"pooling {pooling!r}; valid: "
                       f"{', '.join(pooling_lib.POOLINGS)} (or None)")
    self.cfg = cfg
    self.remat = remat
    self.scan_layers = scan_layers
    self.pooling = pooling
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = Embeddings(cfg, **kw)
    self.layers = nnx.List([
        Layer(cfg, attention_impl=attention_impl, dense_factory=dense_factory,
              **kw) for _ in range(cfg.num_hidden_layers)])
    # Pre-LN: the residual stream is never normalised inside the layers.
    self.final_layer_norm = (_layer_norm(cfg, **kw) if cfg.pre_layer_norm
                             else None)
    self.pooler = (dense_builder(cfg, dense_factory, **kw)(
        cfg.hidden_size, cfg.hidden_size, kernel_axes=("embed", None),
        name="pooler") if pooling == "pooler" else None)

  def encode(self, x, mask, prefixes, *, sow_attention=False, rngs=None):
    """The layers over the embedded input x [batch, length, hidden].

    With `scan_layers` the layers run as one `jax.lax.scan` over their
    weights stacked at call time: XLA traces and compiles one layer instead
    of `num_hidden_layers` (compile time divided by about the depth), while
    the weights keep their per-layer names (Hugging Face I/O, PEFT,
    checkpoints unchanged); the stacking costs one copy of the layers'
    weights per step (and of their gradients). Unrolled otherwise, and
    whenever the layers differ (pruned heads) or their attention is sown
    (interpretability). Both draw each layer's dropout from the same key.
    """
    keys = _layer_keys(rngs, len(self.layers))
    def call(layer, x, mask, prefix, key):  # positional only: nnx.remat
      return _call_layer(layer, x, mask, prefix, key, sow_attention)
    if self.remat:  # each layer's activations recomputed in the backward
      call = nnx.remat(call)
    split = [nnx.split(layer) for layer in self.layers]
    same = all(g == split[0][0] for g, _ in split[1:])
    if not (self.scan_layers and same and not sow_attention):
      for layer, prefix, key in zip(self.layers, prefixes, keys):
        x = call(layer, x, mask, prefix, key)
      return x
    graphdef = split[0][0]
    stack = lambda *xs: jnp.stack(xs)  # pylint: disable=unnecessary-lambda-assignment
    weights = jax.tree.map(stack, *[state for _, state in split])
    xs = {"weights": weights,
          "key": None if rngs is None else jnp.stack(keys),
          "prefix": (None if prefixes[0] is None
                     else jax.tree.map(stack, *prefixes))}

    def body(h, step):
      layer = nnx.merge(graphdef, step["weights"])
      return _call_layer(layer, h, mask, step["prefix"], step["key"],
                         False), None

    if self.remat:
      body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, x, xs)
    return x

  @classmethod
  def hf_key_map(cls, cfg: BertConfig) -> HfKeyMap:
    """Hugging Face names (without the 'bert.'/'roberta.' prefix) -> ours."""
    m = {
        "embeddings.word_embeddings.weight": (("embeddings", "word_embeddings", "embedding"), "copy"),
        "embeddings.position_embeddings.weight": (("embeddings", "position_embeddings", "embedding"), "copy"),
        "embeddings.token_type_embeddings.weight": (("embeddings", "token_type_embeddings", "embedding"), "copy"),
        **hf_linear_keys("pooler.dense", ("pooler",)),
        **hf_layer_norm_keys("embeddings.LayerNorm", ("embeddings", "layer_norm")),
    }
    for i in range(cfg.num_hidden_layers):
      hf, ours = f"encoder.layer.{i}.", ("layers", i)
      for name in ("query", "key", "value"):
        m[f"{hf}attention.self.{name}.weight"] = (ours + ("attention", name, "kernel"), "qkv_kernel")
        m[f"{hf}attention.self.{name}.bias"] = (ours + ("attention", name, "bias"), "qkv_bias")
      m[f"{hf}attention.output.dense.weight"] = (ours + ("attention", "output", "kernel"), "out_kernel")
      m[f"{hf}attention.output.dense.bias"] = (ours + ("attention", "output", "bias"), "copy")
      m.update(hf_layer_norm_keys(f"{hf}attention.output.LayerNorm", ours + ("attention_layer_norm",)))
      m.update(hf_linear_keys(f"{hf}intermediate.dense", ours + ("intermediate",)))
      m.update(hf_linear_keys(f"{hf}output.dense", ours + ("output",)))
      m.update(hf_layer_norm_keys(f"{hf}output.LayerNorm", ours + ("output_layer_norm",)))
    return m

  def prune_heads(self, heads: dict) -> None:
    """Removes attention heads: `{layer: [head, ...]}`, original indices.

    As Hugging Face's `PreTrainedModel.prune_heads`; see
    `SelfAttention.prune_heads`. `research.models.hf` writes them to (and
    reads them from) config.json's `pruned_heads`.
    """
    for layer, layer_heads in heads.items():
      if not 0 <= int(layer) < len(self.layers):
        raise ValueError(f"pruned heads of layer {layer}: the model has "
                         f"layers 0..{len(self.layers) - 1}")
      self.layers[int(layer)].attention.prune_heads(layer_heads)

  @property
  def pruned_heads(self) -> dict[int, tuple[int, ...]]:
    """`{layer: removed heads}` of the layers that lost heads."""
    return {i: layer.attention.pruned_heads
            for i, layer in enumerate(self.layers) if layer.attention.pruned_heads}

  def position_ids(self, attention_mask, segment_ids=None):
    """Absolute positions; RoBERTa counts only real tokens, from pad_id + 1.

    With `segment_ids` the count restarts at each example of a packed row.
    """
    # An iota rather than jnp.arange(length): the same numbers, and it keeps
    # a symbolic length symbolic (jax.export, jax2onnx's dynamic axes).
    index = jax.lax.broadcasted_iota(jnp.int32, attention_mask.shape,
                                     attention_mask.ndim - 1)
    if segment_ids is None:
      if self.cfg.model_type == "roberta":
        return (jnp.cumsum(attention_mask, axis=-1) * attention_mask
                + self.cfg.pad_token_id)
      return index
    # An example starts where the segment id changes; a token's position is
    # its distance to the latest start.
    change = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    within = index - jax.lax.cummax(jnp.where(change, index, 0), axis=1)
    if self.cfg.model_type == "roberta":
      return (within + 1) * attention_mask + self.cfg.pad_token_id
    return within

  def __call__(self, input_ids, attention_mask, token_type_ids=None,
               position_ids=None, *, segment_ids=None, example_starts=None,
               inputs_embeds=None, prefix_kv: Sequence | None = None,
               sow_attention=False, rngs=None):
    """The encoder's forward pass.

    Args:
      input_ids: int [batch, length], or None with `inputs_embeds`.
      attention_mask: int [batch, length], 1 = real token.
      token_type_ids: int [batch, length] (default zeros).
      position_ids: int [batch, length] (default `self.position_ids`).
      segment_ids, example_starts: packed rows (see the class docstring).
      inputs_embeds: [batch, length, hidden] word embeddings used instead of
        looking up `input_ids`; position and token-type embeddings,
        LayerNorm and dropout still apply.
      prefix_kv: per layer, (key, value) each [batch (or 1), prefix_len,
        heads, head_dim] prepended to that layer's keys and values; every
        token attends to the whole prefix. Indexable by layer: a list of
        pairs or an array [layers, 2, batch, prefix_len, heads, head_dim].
        Positions are not shifted (Hugging Face's `past_key_values` shift
        them by prefix_len; pass `position_ids` to do the same).
      sow_attention: sow each layer's attention probabilities (see
        `stack_attention`); computes them explicitly instead of the fused
        kernel.
      rngs: an `nnx.Rngs` with a `dropout` stream; None = evaluation.

    Returns:
      (sequence_output [batch, length, hidden], pooled_output or None).
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if token_type_ids is None:
      token_type_ids = jnp.zeros(attention_mask.shape, jnp.int32)
    if position_ids is None:
      position_ids = self.position_ids(attention_mask, segment_ids)
    x = self.embeddings(input_ids, token_type_ids, position_ids,
                        inputs_embeds=inputs_embeds, rngs=rngs)
    if segment_ids is None:
      # [batch, 1, 1, kv_length]: every query may attend to every real key.
      mask = attention_mask.astype(bool)[:, None, None, :]
    else:
      # [batch, 1, q, kv]: block-diagonal; padding (segment 0) sees padding,
      # so that no row of the softmax is empty.
      mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    prefixes = [None] * len(self.layers)
    if prefix_kv is None and getattr(self, "prefix_encoder", None) is not None:
      # Trained prefixes a method attached (research.methods.prefix_tuning).
      prefix_kv = self.prefix_encoder(rngs=rngs)
    if prefix_kv is not None:
      if len(prefix_kv) != len(self.layers):
        raise ValueError(f"prefix_kv has {len(prefix_kv)} layers; the model "
                         f"has {len(self.layers)}")
      prefixes = [tuple(prefix_kv[i]) for i in range(len(self.layers))]
      prefix_len = prefixes[0][0].shape[-3]
      # Every query sees the prefix: [batch, 1, 1 | q, prefix_len + kv].
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (prefix_len,), bool),
                              mask], axis=-1)
    x = self.encode(x, mask, prefixes, sow_attention=sow_attention, rngs=rngs)
    if self.final_layer_norm is not None:
      x = self.final_layer_norm(x)
    if self.pooling is None:
      return x, None
    pooled = pooling_lib.pool(x, attention_mask, self.pooling,
                              segment_ids=segment_ids,
                              example_starts=example_starts)
    if self.pooler is not None:
      pooled = jnp.tanh(self.pooler(pooled))
    return x, pooled
