"""The layers of parameter-efficient fine-tuning, built by a `dense_factory`.

Every dense layer of the model is made by `research.models.bert.make_dense`
(the `dense_factory` hook); each class here is an `nnx.LinearGeneral` whose
`kernel` and `bias` stay where the default layer keeps them, so Hugging Face
import and export and the frozen/trainable split work unchanged, with the
method's weights added beside them:

  LoRADense      W x + (alpha / r) B A x (Hu et al. 2021); A, B in an
                 `nnx.LoRA` of `nnx.LoRAParam`s; `merge` / `unmerge`.
  AdaLoRADense   W x + (alpha / (r + 1e-5)) P diag(lambda) Q x (Zhang et
                 al. 2023), as PEFT's `AdaLoraLayer`; `merge` / `unmerge`.
  AdapterDense   y + up(act(down(y))) on the layer's output y: a bottleneck
                 adapter (Houlsby et al. 2019) before the residual add and
                 LayerNorm.

`layer_name_matches` decides which layers a method changes, by the names
`make_dense` is given ("attention.query", "intermediate", "output", ...).

Input dropout of LoRA/AdaLoRA (PEFT's `lora_dropout`): the dense layers are
called as `layer(x)`, without the step's dropout key, so each layer keeps a
`DropoutState` (a key and an on/off flag, not parameters: they travel with
the frozen part) that the method's `wrap_loss` sets from the step's key
(`with_dropout_keys`). Evaluation never sets it, so it runs without dropout.
"""

from __future__ import annotations

import difflib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.configs.plugins import ConfigError

# Layers of the encoder (the names `make_dense` is given) that "all-linear"
# selects; the task heads are trained whole instead.
ENCODER_LAYERS = ("attention.query", "attention.key", "attention.value",
                  "attention.output", "intermediate", "output", "pooler")


def layer_name_matches(name: str, targets) -> bool:
  """Whether the dense layer `name` is one of `targets`.

  A target matches the whole name or its last dotted parts: "query" matches
  "attention.query"; "output" matches the FFN's "output" and
  "attention.output". "all-linear" is every layer of `ENCODER_LAYERS`.
  """
  for target in targets:
    if target == "all-linear" and name in ENCODER_LAYERS:
      return True
    if name == target or name.endswith("." + target):
      return True
  return False


def check_targets(targets, field: str):
  """The targets as a tuple; ConfigError naming `field` for a name no layer has."""
  if isinstance(targets, str):
    targets = (targets,)
  valid = set(ENCODER_LAYERS) | {n.rsplit(".", 1)[-1] for n in ENCODER_LAYERS}
  valid |= {"all-linear"}
  for t in targets:
    if t not in valid:
      near = difflib.get_close_matches(t, sorted(valid), n=1)
      raise ConfigError(
          f"{field}: no dense layer is named {t!r}"
          + (f" (did you mean {near[0]!r}?)" if near else "")
          + f"; valid: {', '.join(sorted(valid))}")
  if not targets:
    raise ConfigError(f"{field}: empty; name at least one layer, e.g. "
                      "('query', 'value') or ('all-linear',)")
  return tuple(targets)


class DropoutState(nnx.Variable):
  """A layer's dropout key and switch: set per step by the method (not trained)."""


def with_dropout_keys(rest: nnx.State, key) -> nnx.State:
  """`rest` with every layer's `DropoutState` switched on and keyed from `key`.

  Each layer gets `fold_in(key, i)` (i: its index in the state), so layers
  draw independent masks, and a step's masks are a function of its key
  (resume stays exact).
  """
  flat = nnx.to_flat_state(rest)
  out, i = [], 0
  for path, var in flat:
    if path[-1] == "dropout_key":
      var = var.replace(jax.random.key_data(jax.random.fold_in(key, i)))
      i += 1
    elif path[-1] == "dropout_on":
      var = var.replace(jnp.ones((), bool))
    out.append((path, var))
  return nnx.from_flat_state(out)


def _flat_in(x, axis):
  """x [..., *in] -> [..., prod(in)] for the contracted (trailing) axes."""
  n_in = len(axis) if isinstance(axis, tuple) else 1
  return x.reshape(x.shape[:x.ndim - n_in] + (-1,))


class _LowRankDense(nnx.LinearGeneral):
  """Shared parts: flattening, input dropout, merge/unmerge of `delta`."""

  def _init_dropout(self, rate):
    self.dropout_rate = float(rate)
    if self.dropout_rate > 0:
      self.dropout_key = DropoutState(jnp.zeros((2,), jnp.uint32))
      self.dropout_on = DropoutState(jnp.zeros((), bool))
    self.merged = False

  def _sizes(self):
    kernel = self.kernel[...]
    n_in = len(self.axis) if isinstance(self.axis, tuple) else 1
    return (math.prod(kernel.shape[:n_in]), math.prod(kernel.shape[n_in:]))

  def _drop(self, x):
    if self.dropout_rate <= 0:
      return x
    key = jax.random.wrap_key_data(self.dropout_key[...])
    keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
    dropped = jnp.where(keep, x / (1.0 - self.dropout_rate), 0.0).astype(x.dtype)
    return jnp.where(self.dropout_on[...], dropped, x)

  def delta(self) -> jax.Array:
    """The update of the kernel, in its shape."""
    raise NotImplementedError

  def low_rank(self, x_flat) -> jax.Array:
    """The update applied to flattened inputs: [..., in] -> [..., out]."""
    raise NotImplementedError

  def __call__(self, inputs, out_sharding=None):
    y = super().__call__(inputs, out_sharding=out_sharding)
    if self.merged:
      return y
    x = _flat_in(self._drop(inputs), self.axis)
    return y + self.low_rank(x).reshape(y.shape).astype(y.dtype)

  def merge(self):
    """Adds the update into `kernel` (the layer then costs a plain matmul)."""
    if not self.merged:
      self.kernel[...] = self.kernel[...] + self.delta().astype(self.kernel.dtype)
      self.merged = True

  def unmerge(self):
    """Takes the update out of `kernel` again."""
    if self.merged:
      self.kernel[...] = self.kernel[...] - self.delta().astype(self.kernel.dtype)
      self.merged = False


class LoRADense(_LowRankDense):
  """A dense layer with a LoRA update (PEFT's `lora.Linear`).

  `self.lora` is an `nnx.LoRA` (A: [in, r], B: [r, out], `nnx.LoRAParam`s)
  on the flattened input and output; A starts as PEFT's
  kaiming_uniform(a=sqrt(5)), B at zero, so the model starts as the base.
  """

  def __init__(self, *args, lora_rank: int, lora_alpha: float,
               lora_dropout: float = 0.0, **kw):
    super().__init__(*args, **kw)
    n_in, n_out = self._sizes()
    self.alpha = float(lora_alpha)
    self.scale = float(lora_alpha) / lora_rank
    self.lora = nnx.LoRA(
        n_in, lora_rank, n_out, dtype=self.dtype, param_dtype=self.param_dtype,
        a_initializer=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        b_initializer=nnx.initializers.zeros, rngs=kw["rngs"],
        a_metadata={"out_sharding": (None, None), "eager_sharding": False},
        b_metadata={"out_sharding": (None, None), "eager_sharding": False})
    self._init_dropout(lora_dropout)

  def low_rank(self, x_flat):
    return self.lora(x_flat) * self.scale

  def delta(self):
    ab = self.lora.lora_a[...] @ self.lora.lora_b[...] * self.scale
    return ab.reshape(self.kernel.shape)


class AdaLoRADense(_LowRankDense):
  """A dense layer with AdaLoRA's SVD-form update (PEFT's `adalora.SVDLinear`).

  lora_a (P^T, [in, r]), lora_e (the singular values lambda, [r]), lora_b
  (Q^T, [r, out]); update `(x A * E) B * alpha / (r + 1e-5)`, r the initial
  rank (PEFT's `ranknum`). E starts at zero (the base model), A and B as
  normal(0, 0.02). Rank allocation zeroes entries of E
  (`research.methods.peft.adalora_allocation`).
  """

  def __init__(self, *args, lora_rank: int, lora_alpha: float,
               lora_dropout: float = 0.0, **kw):
    super().__init__(*args, **kw)
    n_in, n_out = self._sizes()
    rngs = kw["rngs"]
    init = nnx.initializers.normal(0.02)
    meta = {"out_sharding": (None, None), "eager_sharding": False}
    self.lora_a = nnx.LoRAParam(init(rngs.params(), (n_in, lora_rank), self.param_dtype), **meta)
    self.lora_e = nnx.LoRAParam(jnp.zeros((lora_rank,), self.param_dtype),
                                out_sharding=(None,), eager_sharding=False)
    self.lora_b = nnx.LoRAParam(init(rngs.params(), (lora_rank, n_out), self.param_dtype), **meta)
    self.alpha = float(lora_alpha) if lora_alpha > 0 else float(lora_rank)
    self.scale = self.alpha / (
        float(lora_rank) + 1e-5)
    self._init_dropout(lora_dropout)

  def low_rank(self, x_flat):
    a, e, b = (v[...].astype(x_flat.dtype) for v in (self.lora_a, self.lora_e, self.lora_b))
    return ((x_flat @ a) * e) @ b * self.scale

  def delta(self):
    ab = (self.lora_a[...] * self.lora_e[...]) @ self.lora_b[...] * self.scale
    return ab.reshape(self.kernel.shape)


class AdapterParam(nnx.Param):
  """A bottleneck adapter's weights (trained; selected by type)."""


ADAPTER_ACTIVATIONS = {"relu": jax.nn.relu,
                       "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                       "swish": jax.nn.silu}


class AdapterDense(nnx.LinearGeneral):
  """A dense layer followed by a bottleneck adapter: `y + up(act(down(y)))`.

  `down` [out, out / reduction_factor] starts as normal(0, 0.02) and `up`
  at zero, so the layer starts as the base layer (the adapter is the
  identity); the adapter sits before the block's dropout, residual add and
  LayerNorm, as in Houlsby et al. (2019).
  """

  def __init__(self, *args, reduction_factor: int, activation: str = "relu",
               **kw):
    super().__init__(*args, **kw)
    out = self.kernel.shape[-1]
    if out % reduction_factor:
      raise ValueError(f"adapter reduction_factor {reduction_factor} does not "
                       f"divide the layer's width {out}")
    mid = out // reduction_factor
    rngs = kw["rngs"]
    p = lambda v, axes: AdapterParam(v, out_sharding=axes, eager_sharding=False)  # pylint: disable=unnecessary-lambda-assignment
    self.adapter_down = p(nnx.initializers.normal(0.02)(
        rngs.params(), (out, mid), self.param_dtype), ("embed", None))
    self.adapter_down_bias = p(jnp.zeros((mid,), self.param_dtype), (None,))
    self.adapter_up = p(jnp.zeros((mid, out), self.param_dtype), (None, "embed"))
    self.adapter_up_bias = p(jnp.zeros((out,), self.param_dtype), ("embed",))
    self.activation = ADAPTER_ACTIVATIONS[activation]

  def __call__(self, inputs, out_sharding=None):
    y = super().__call__(inputs, out_sharding=out_sharding)
    h = self.activation(y @ self.adapter_down[...].astype(y.dtype)
                        + self.adapter_down_bias[...].astype(y.dtype))
    return y + (h @ self.adapter_up[...].astype(y.dtype)
                + self.adapter_up_bias[...].astype(y.dtype))


def low_rank_layers(model):
  """(path, layer) of every LoRA/AdaLoRA layer of `model`, in model order."""
  return [(path, m) for path, m in nnx.iter_modules(model)
          if isinstance(m, _LowRankDense)]


def merge(model):
  """Merges every LoRA/AdaLoRA update into its kernel, in place."""
  for _, layer in low_rank_layers(model):
    layer.merge()
  return model


def unmerge(model):
  """Undoes `merge`, in place."""
  for _, layer in low_rank_layers(model):
    layer.unmerge()
  return model
