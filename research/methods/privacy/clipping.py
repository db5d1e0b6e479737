"""DP-SGD gradients: per-example clipping, one Gaussian noise draw per logical batch.

The private gradient of a logical batch B (Abadi et al. 2016) is

    g = (sum_{i in B} clip_C(grad loss_i) + N(0, (sigma C)^2 I)) / b

with `clip_C(v) = v * min(1, C / |v|)` (global L2 norm over all weights) and
`b` the *expected* batch size: under Poisson sampling the real size varies
and is itself private, so it must not be the divisor.

Two pieces, so that every parallel layout adds the noise exactly once:

- `clip_and_sum` (per device, per micro-batch): per-example gradients by
  `jax.vmap(jax.grad)` over chunks of `chunk_size` examples, looped so
  memory holds one chunk of per-example gradients at a time; clipped to C and
  summed. Rows with weight 0 (the padding of a variable-size Poisson batch)
  contribute exactly zero.
- `add_noise` (once per logical batch): after the caller has summed the
  clipped sums over devices (`psum`) and accumulation micro-steps, add noise
  of std sigma*C from a key that is the same on every device (the step passes
  `fold_in(seed_key, step)`: resume reproduces it), divide by b.

`dp_value_and_grad` composes the two for one device, or for one data-parallel
`shard_map` program when given `axis_name`.

Built on jax-privacy 2.0 (`jax_privacy.clipped_grad`: per-example
clipping, NaN-safe, zero for padding rows, microbatched by
`optax.microbatching.micro_vmap`), which installs beside jax 0.10.2 and
optax 0.2.8 with light dependencies (dp-accounting, chex, pydantic). Its
noise (`jax_privacy.noise_addition.gaussian_privatizer`) keeps its PRNG key in
optimiser state and splits it each step; here the key comes from the step
number instead, so the noise of step t depends on (seed, t) alone, whatever
was restored, and it is a plain `optax.tree.random_like` draw.

Privacy caveats the caller must keep: the per-example loss may only read its
own example (no batch statistics across examples, no packed rows: see
`check_batch`); the reported mean loss, gradient norms and clip fraction are
computed from private data without noise (monitoring only, outside the
guarantee).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax_privacy
import optax

PACKED_KEYS = ("segment_ids", "example_starts")


def check_batch(batch: dict, chunk_size: int | None) -> int:
  """Refuses batches that break per-example clipping; returns the batch size.

  Args:
    batch: arrays with a leading example axis and a `weights` [B] entry.
    chunk_size: examples per vmapped chunk (None: the whole batch at once).

  Returns:
    B, the number of rows.
  """
  packed = [k for k in PACKED_KEYS if k in batch]
  if packed:
    raise ValueError(
        f"DP-SGD got packed rows (batch keys {packed}): several examples "
        "share a row, so clipping a row's gradient does not bound one "
        "example's influence; set config.data.examples_per_row = 1")
  if "weights" not in batch:
    raise ValueError("DP-SGD needs batch['weights'] [B] (0 marks padding "
                     f"rows); batch keys: {sorted(batch)}")
  size = batch["weights"].shape[0]
  if chunk_size is not None and (chunk_size < 1 or size % chunk_size):
    raise ValueError(
        f"config.method_options.dp_sgd.chunk_size = {chunk_size} must divide the per-device "
        f"batch of {size} rows (choose a divisor of {size}, or None for all "
        "rows at once)")
  return size


# Per-example scalings of a gradient g before the clip to C:
#   flat       g * min(1, C / |g|) (Abadi et al. 2016; the clip alone);
#   automatic  C * g / (|g| + stability) (Bu et al. 2022, "Automatic
#              Clipping: Differentially Private Deep Learning Made Easier
#              and Stronger", AUTO-S): every example normalised, so a small
#              gradient is scaled up rather than left as it is; its norm is
#              below C, so the clip that follows changes nothing and the
#              sensitivity stays C.
CLIPPINGS = ("flat", "automatic")


def clip_and_sum(per_example_loss_fn: Callable[..., jax.Array], *,
                 clip_norm: float, chunk_size: int | None = None,
                 clipping: str = "flat", stability: float = 0.01):
  """Sum of per-example gradients clipped to `clip_norm`.

  Args:
    per_example_loss_fn: `(params, example, key) -> scalar loss`, where
      `example` is the batch dict sliced to one example (leading axis of
      size 1) and `key` that example's own PRNG key (dropout).
    clip_norm: C, the bound on each example's gradient L2 norm (all weights).
    chunk_size: examples whose gradients are held in memory at once (must
      divide the batch); None differentiates the whole batch in one vmap.
    clipping: "flat" or "automatic" (`CLIPPINGS`).
    stability: automatic clipping's gamma in C * g / (|g| + gamma).

  Returns:
    `fn(params, batch, key) -> (clipped_sum, stats)`: `clipped_sum` has the
    structure of `params`; `stats` holds `loss_sum` (sum of weight * loss),
    `weight_sum`, `count` (rows with weight != 0), `clipped` (examples whose
    norm exceeded C), all summable
    across devices, and `grad_norms` [B] (per-example norms before clipping,
    0 on padding rows).
  """
  if not clip_norm > 0:
    raise ValueError(f"config.method_options.dp_sgd.clip_norm = {clip_norm} must be > 0")
  if clipping not in CLIPPINGS:
    raise ValueError(f"config.method_options.dp_sgd.clipping = {clipping!r}; "
                     f"valid: {', '.join(CLIPPINGS)}")
  if clipping == "automatic" and not stability > 0:
    raise ValueError("config.method_options.dp_sgd.stability = "
                     f"{stability} must be > 0")

  def normalise(grad):
    # Within jax_privacy's per-example map: one example's gradient.
    scale = clip_norm / (optax.tree.norm(grad) + stability)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grad)

  def weighted_loss(params, example, key):
    # The weight scales the gradient *before* clipping: 0 removes a padding
    # row, any weight keeps the bound C.
    return per_example_loss_fn(params, example, key) * example["weights"][0]

  grad_fn = jax_privacy.clipped_grad(
      weighted_loss, argnums=0, batch_argnums=1, prng_argnum=2,
      l2_clip_norm=clip_norm, keep_batch_dim=True, return_values=True,
      return_grad_norms=True, microbatch_size=chunk_size,
      # The norms it returns are from before this (what monitoring wants).
      pre_clipping_transform=normalise if clipping == "automatic"
      else lambda g: g)

  def fn(params, batch, key):
    check_batch(batch, chunk_size)
    real = batch["weights"] != 0
    grads, aux = grad_fn(params, batch, key, is_padding_example=~real)
    norms = jnp.where(real, aux.grad_norms, 0.0)
    return grads, {
        # where, not weight * loss: a padding row's loss may be NaN.
        "loss_sum": jnp.where(real, aux.values, 0.0).sum(),
        "weight_sum": batch["weights"].sum().astype(jnp.float32),
        "count": real.sum().astype(jnp.float32),
        "clipped": (norms > clip_norm).sum().astype(jnp.float32),
        "norm_sum": norms.sum(),
        "grad_norms": norms}
  return fn


def squared_sum(per_example_loss_fn: Callable[..., jax.Array], *,
                chunk_size: int | None = None):
  """Sum over a batch of squared per-example gradients: EWC's Fisher.

  The same per-example machinery as `clip_and_sum` (jax-privacy's
  `clipped_grad`, microbatched, zero for padding rows), with no clipping
  (an infinite bound) and each example's gradient squared elementwise
  before the sum.

  Returns:
    `fn(params, batch, key) -> (squared_sum, count)`: `squared_sum` has
    the structure of `params`; `count` is the number of real rows.
  """
  def weighted_loss(params, example, key):
    return per_example_loss_fn(params, example, key) * example["weights"][0]

  grad_fn = jax_privacy.clipped_grad(
      weighted_loss, argnums=0, batch_argnums=1, prng_argnum=2,
      l2_clip_norm=jnp.inf, keep_batch_dim=True, microbatch_size=chunk_size,
      pre_clipping_transform=lambda g: jax.tree.map(jnp.square, g))

  def fn(params, batch, key):
    check_batch(batch, chunk_size)
    real = batch["weights"] != 0
    return (grad_fn(params, batch, key, is_padding_example=~real),
            real.sum().astype(jnp.float32))
  return fn


def add_noise(clipped_sum: Any, key: jax.Array, *, clip_norm: float,
              noise_multiplier: float, expected_batch_size: float) -> Any:
  """`(clipped_sum + N(0, (sigma C)^2)) / expected_batch_size`, once per batch.

  Call it once per logical batch on the clipped sum over all devices and
  accumulation micro-steps, with a key that is the same on every device.

  Args:
    clipped_sum: the summed clipped gradients (any pytree of float arrays).
    key: the noise key (e.g. `fold_in(seed_key, step)`).
    clip_norm: C.
    noise_multiplier: sigma (0 disables the noise: no privacy).
    expected_batch_size: b = q * N, the divisor.

  Returns:
    The private mean gradient, same structure and dtypes as `clipped_sum`.
  """
  noise = optax.tree.random_like(key, clipped_sum, jax.random.normal)
  std = noise_multiplier * clip_norm
  return jax.tree.map(
      lambda g, z: ((g + std * z) / expected_batch_size).astype(g.dtype),
      clipped_sum, noise)


def _device_varying(tree, axis_name):
  """`tree` cast to vary over `axis_name` (no-op where it already does)."""
  axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)

  def varying(x):  # jax 0.10 keeps the set in `.mat`; older releases `.vma`
    aval = jax.typeof(x)
    return aval.mat.varying if hasattr(aval, "mat") else aval.vma

  def cast(x):
    missing = tuple(a for a in axes if a not in varying(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def dp_value_and_grad(per_example_loss_fn: Callable[..., jax.Array], *,
                      clip_norm: float, noise_multiplier: float,
                      expected_batch_size: float, chunk_size: int | None = None,
                      axis_name: str | tuple[str, ...] | None = None,
                      clipping: str = "flat", stability: float = 0.01):
  """The DP-SGD counterpart of `jax.value_and_grad` for one logical batch.

  Args:
    per_example_loss_fn: `(params, example, key) -> scalar` (see
      `clip_and_sum`).
    clip_norm: C.
    noise_multiplier: sigma; the noise std is sigma * C.
    expected_batch_size: b, the divisor (the mean Poisson batch size).
    chunk_size: per-example gradients held at once (see `clip_and_sum`).
    axis_name: the data-parallel mesh axis (or axes) when called inside
      `jax.shard_map` on a batch shard: clipped sums are `psum`-ed and the
      noise is added once to the total. None on a single program.
    clipping, stability: see `clip_and_sum`.

  Returns:
    `fn(params, batch, key, noise_key=None, noise_scale=1.0) -> (mean_loss,
    grads, aux)`. Without `noise_key`, `key` must be the same on every
    device: dropout keys are derived from it per device and per example, the
    noise key once. With `noise_key` (the same on every device), `key` is
    the dropout key alone and may differ per device. `noise_scale` (may be
    traced) multiplies the noise: 0 on the micro-batches of an accumulated
    logical batch but its last. `mean_loss` is the weighted mean over the
    (global) batch; `aux` has `grad_norms` [B local], `clip_fraction` and
    `num_examples` (global), and `metrics`: `dp/clip_fraction`,
    `dp/example_grad_norm_mean` and `dp/example_grad_norm_max` (per-example
    norms before clipping, global; monitoring, outside the guarantee).
  """
  if noise_multiplier < 0:
    raise ValueError(f"config.method_options.dp_sgd.noise_multiplier = {noise_multiplier} "
                     "must be >= 0")
  if not expected_batch_size > 0:
    raise ValueError(f"config.batch_size (the expected batch size) = "
                     f"{expected_batch_size} must be > 0")
  clipped = clip_and_sum(per_example_loss_fn, clip_norm=clip_norm,
                         chunk_size=chunk_size, clipping=clipping,
                         stability=stability)

  def fn(params, batch, key, noise_key=None, noise_scale=1.0):
    if noise_key is None:
      noise_key, dropout_key = jax.random.split(key)
    else:
      dropout_key = key
    if axis_name is not None:
      dropout_key = jax.random.fold_in(dropout_key,
                                       jax.lax.axis_index(axis_name))
      # Under shard_map(check_vma=True) the gradient of a replicated input
      # is psum-ed by its transpose, inside the per-example vmap: each
      # "per-example" gradient would be a sum over devices, clipped as one.
      # Marked device-varying, params get per-device gradients in either
      # check_vma mode, and the psum below is the only reduction.
      params = _device_varying(params, axis_name)
    grad_sum, stats = clipped(params, batch, dropout_key)
    norms = stats.pop("grad_norms")
    norm_max = norms.max()
    if axis_name is not None:
      grad_sum, stats = jax.lax.psum((grad_sum, stats), axis_name)
      norm_max = jax.lax.pmax(norm_max, axis_name)
    grads = add_noise(grad_sum, noise_key, clip_norm=clip_norm,
                      noise_multiplier=noise_multiplier * noise_scale,
                      expected_batch_size=expected_batch_size)
    count = jnp.maximum(stats["count"], 1.0)
    return stats["loss_sum"] / jnp.maximum(stats["weight_sum"], 1.0), grads, {
        "grad_norms": norms,
        "clip_fraction": stats["clipped"] / count,
        "num_examples": stats["count"],
        "metrics": {"dp/clip_fraction": stats["clipped"] / count,
                    "dp/example_grad_norm_mean": stats["norm_sum"] / count,
                    "dp/example_grad_norm_max": norm_max}}
  return fn
