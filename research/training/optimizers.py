"""Optax optimisers and learning-rate schedules built from `config.optimizer`.

Everything here composes stock optax transformations; there is no
hand-written optimiser maths. The transformation `build_optimizer` returns is,
from the outside in:

  apply_if_finite(              # skip a non-finite gradient, count the skips
    MultiSteps(                 # only when grad_accum_steps > 1
      chain(
        clip_by_global_norm,    # only when grad_clip_norm > 0
        adamw | adafactor | lamb,  # weight decay masked to ndim >= 2 leaves
      )))

The order matters. `apply_if_finite` is outermost so that a NaN/Inf
micro-batch gradient never reaches `MultiSteps`: inside it, one NaN would be
averaged into the accumulator and stay there (its reset multiplies by 0, and
0 * NaN is NaN). Outermost, a bad gradient returns zero updates and leaves the
whole inner state (accumulator, Adam moments, step counts) untouched.
Clipping sits inside `MultiSteps` so that it sees the accumulated mean
gradient of the full batch, as in BERT.

The one exception is `fused_adamw`, used for the common case (AdamW, no
accumulation, `config.optimizer.fused=True`): the same maths as the chain
above in one element-wise pass per parameter. It exists for speed; see its
docstring for why optax's composition is slower and what was measured.
"""

from typing import NamedTuple

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("adamw", "adafactor", "lamb")
SCHEDULES = ("linear", "cosine", "constant")

# `apply_if_finite` gives up and applies a bad update after this many
# consecutive non-finite gradients. Its counter saturates at the int32 maximum,
# so with this bound the give-up branch can never be taken; the trainer stops
# the run itself after `config.max_bad_steps` (see `bad_step_count`).
_NEVER_APPLY_NON_FINITE = int(np.iinfo(np.int32).max)


def warmup_steps(opt_config, total_steps):
  """Number of warmup steps the schedule uses.

  Args:
    opt_config: `config.optimizer`; reads `warmup_steps` and
      `warmup_proportion`.
    total_steps: optimizer updates in the whole run.

  Returns:
    `opt_config.warmup_steps` when it is >= 0, otherwise
    `round(opt_config.warmup_proportion * total_steps)`.

  Raises:
    ValueError: if the warmup is negative or longer than `total_steps`.
  """
  if opt_config.warmup_steps >= 0:
    steps, field = int(opt_config.warmup_steps), "config.optimizer.warmup_steps"
  else:
    if not 0.0 <= opt_config.warmup_proportion <= 1.0:
      raise ValueError(
          "config.optimizer.warmup_proportion must be in [0, 1], got "
          f"{opt_config.warmup_proportion}.")
    steps = int(round(opt_config.warmup_proportion * total_steps))
    field = "config.optimizer.warmup_proportion"
  if steps > total_steps:
    raise ValueError(
        f"{field} gives {steps} warmup steps, more than the {total_steps} "
        "optimizer steps of the run.")
  return steps


def learning_rate_schedule(opt_config, total_steps):
  """The learning-rate schedule: linear warmup from 0, then decay.

  Args:
    opt_config: `config.optimizer`; reads `learning_rate`, `schedule`,
      `warmup_steps` and `warmup_proportion`.
    total_steps: optimizer updates in the whole run. With gradient
      accumulation the schedule is stepped once per update, not per
      micro-batch, so this must be counted in updates (see
      `steps_from_config`).

  Returns:
    An `optax.Schedule` mapping the update count to a learning rate: 0 at step
    0, `learning_rate` at the end of warmup, then
    `linear`: linear decay to 0 at `total_steps` (BERT);
    `cosine`: cosine decay to 0 at `total_steps`;
    `constant`: `learning_rate` from then on.

  Raises:
    ValueError: for an unknown `config.optimizer.schedule`, a non-positive
      `total_steps` or a warmup longer than the run.
  """
  if total_steps <= 0:
    raise ValueError(
        f"total_steps must be positive, got {total_steps} (from "
        "config.total_steps or config.num_epochs).")
  name = opt_config.schedule
  if name not in SCHEDULES:
    raise ValueError(
        f"Unknown config.optimizer.schedule {name!r}; valid choices: "
        f"{', '.join(SCHEDULES)}.")
  lr = float(opt_config.learning_rate)
  warmup = warmup_steps(opt_config, total_steps)
  decay = total_steps - warmup

  if name == "constant":
    after = optax.constant_schedule(lr)
  elif decay == 0:
    # Warmup fills the whole run; linear and cosine both end at 0.
    after = optax.constant_schedule(0.0)
  elif name == "linear":
    after = optax.linear_schedule(lr, 0.0, decay)
  else:
    after = optax.cosine_decay_schedule(lr, decay, alpha=0.0)

  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def weight_decay_mask(params):
  """Which parameters get weight decay: those with ndim >= 2.

  BERT (and Hugging Face's trainer) exclude biases and LayerNorm weights from
  weight decay. In a BERT those are exactly the 1-D parameters, while the
  kernels and the word/position/type embeddings are 2-D (or more), so the rank
  gives the same split without depending on parameter names, which differ
  between an `nnx.State`, a Flax Linen dict and a converted checkpoint.

  Args:
    params: any pytree of arrays, e.g. `nnx.state(model, nnx.Param)` or a
      plain nested dict.

  Returns:
    A pytree of Python bools with the structure of `params`.
  """
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _base_optimizer(opt_config, schedule):
  """adamw | adafactor | lamb with the masked, learning-rate-scaled decay."""
  name = opt_config.name
  wd = float(opt_config.weight_decay)
  if name == "adamw":
    return optax.adamw(
        schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
        weight_decay=wd, mask=weight_decay_mask)
  if name == "lamb":
    return optax.lamb(
        schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
        weight_decay=wd, mask=weight_decay_mask)
  if name == "adafactor":
    # Adafactor adds `weight_decay_rate * param` after the learning-rate
    # scaling; scaling the rate by the schedule gives the same decoupled decay
    # as AdamW (lr * weight_decay * param), so one config value means the same
    # for every optimizer. b1/b2/eps are Adam's; Adafactor keeps its defaults.
    return optax.adafactor(
        schedule,
        weight_decay_rate=(lambda count: wd * schedule(count)) if wd else None,
        weight_decay_mask=weight_decay_mask)
  raise ValueError(
      f"Unknown config.optimizer.name {name!r}; valid choices: "
      f"{', '.join(OPTIMIZERS)}.")


class FusedAdamWState(NamedTuple):
  """State of `fused_adamw`. The last three fields carry the names of
  `optax.ApplyIfFiniteState`'s, so `bad_step_count` and `total_bad_steps`
  read either optimiser."""
  count: jax.Array            # int32: finite updates applied (Adam's t)
  mu: optax.Updates
  nu: optax.Updates
  notfinite_count: jax.Array  # int32: consecutive skipped updates
  last_finite: jax.Array      # bool
  total_notfinite: jax.Array  # int32: all skipped updates


def fused_adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0,
                mask=None, clip_norm=0.0) -> optax.GradientTransformation:
  """`apply_if_finite(chain(clip_by_global_norm, adamw))` in one pass per leaf.

  Why hand-written: optax composes this from three transformations, and XLA
  cannot fuse across their boundaries. `clip_by_global_norm` materialises a
  scaled copy of every gradient, and `apply_if_finite`'s `lax.cond` makes both
  branches write a fresh copy of the new moments and updates. For a 22.7M
  parameter MiniLM that is several extra passes over ~90 MB arrays per step;
  on a 2-core CPU the update took 58 ms as the chain and 22 ms for bare
  `optax.adamw` (BENCHMARKS.md). Here one global reduction (the gradient norm
  and the all-finite flag) is followed by one fused element-wise loop per
  parameter that reads g, mu, nu, p and writes mu, nu and the update, which
  `optax.apply_updates` in the same jit adds to p in place.

  The maths is optax's, term for term (`tests/test_optimizers.py` compares
  both over several steps, a skipped one included):
    clip:  g <- g * min(1, clip_norm / |g|)
    adam:  mu <- b1 mu + (1 - b1) g;  nu <- b2 nu + (1 - b2) g^2;  t <- t + 1
           u <- (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps)
    decay: u <- u + weight_decay * p           (where `mask` is True)
    lr:    update = -learning_rate(t - 1) * u
    skip:  a NaN/Inf anywhere in g (or |g|^2 overflowing) -> zero update,
           state unchanged, counted.

  Args:
    learning_rate: a float or an `optax.Schedule` of the update count.
    b1, b2, eps: Adam's (eps outside the square root, as `optax.adamw`).
    weight_decay: decoupled decay rate, scaled by the learning rate.
    mask: a pytree of bools like the params, or a function of the params
      returning one; None decays everything.
    clip_norm: global-norm clipping threshold; <= 0 disables clipping.

  Returns:
    An `optax.GradientTransformation` whose state is a `FusedAdamWState`.
  """
  schedule = (learning_rate if callable(learning_rate)
              else (lambda _: learning_rate))

  def init(params):
    # A fresh array per field: one shared buffer could not be donated twice.
    zero = lambda: jnp.zeros([], jnp.int32)  # pylint: disable=unnecessary-lambda-assignment
    return FusedAdamWState(
        count=zero(), mu=jax.tree.map(jnp.zeros_like, params),
        nu=jax.tree.map(jnp.zeros_like, params), notfinite_count=zero(),
        last_finite=jnp.array(True), total_notfinite=zero())

  def update(grads, state, params):
    # The norm is NaN or Inf iff some element is (or the squares overflow,
    # |g| ~ 1e19 in float32: skipped too, where optax's chain would clip that
    # gradient to zero and step). One reduction over the gradients serves
    # clipping and the check: a separate max |g| pass cost 6 of 33 ms on
    # MiniLM (BENCHMARKS.md), and `isfinite(g).all()` writes a bool buffer
    # the size of the model.
    norm = optax.tree.norm(grads)
    finite = jnp.isfinite(norm)
    count = optax.safe_increment(state.count)
    lr = schedule(state.count)
    c1 = 1 - b1 ** count
    c2 = 1 - b2 ** count
    decay = mask(params) if callable(mask) else mask
    if decay is None:
      decay = jax.tree.map(lambda _: True, params)

    # A scalar factor, not optax's `g / norm * clip_norm`: a division per
    # element would make XLA keep the clipped gradients in a buffer of their
    # own instead of fusing them into both moment updates (same value to
    # within an ulp).
    scale = (jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
             if clip_norm > 0 else jnp.ones([]))

    def moments(g, mu, nu):
      g = g * scale.astype(g.dtype)
      return (jnp.where(finite, (1 - b1) * g + b1 * mu, mu),
              jnp.where(finite, (1 - b2) * jnp.square(g) + b2 * nu, nu))

    new = jax.tree.map(moments, grads, state.mu, state.nu)
    is_pair = lambda x: isinstance(x, tuple)  # pylint: disable=unnecessary-lambda-assignment
    mu = jax.tree.map(lambda m: m[0], new, is_leaf=is_pair)
    nu = jax.tree.map(lambda m: m[1], new, is_leaf=is_pair)

    def step(m, v, p, decayed):
      u = (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + eps)
      if decayed:
        u = u + weight_decay * p
      return jnp.where(finite, -lr * u, 0).astype(p.dtype)

    updates = jax.tree.map(step, mu, nu, params, decay)
    bad = 1 - finite.astype(jnp.int32)
    return updates, FusedAdamWState(
        count=jnp.where(finite, count, state.count), mu=mu, nu=nu,
        notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1),
        last_finite=finite, total_notfinite=state.total_notfinite + bad)

  return optax.GradientTransformation(init, update)


def build_optimizer(opt_config, total_steps):
  """Builds the full gradient transformation from `config.optimizer`.

  Args:
    opt_config: `config.optimizer`.
    total_steps: optimizer updates in the whole run (micro-batches divided by
      `grad_accum_steps`); the learning-rate schedule ends there.

  Returns:
    An `optax.GradientTransformation`. Its `update` needs `params` (for weight
    decay). With `grad_accum_steps = k > 1` call it once per micro-batch: it
    returns zero updates for k - 1 calls and the update for the mean gradient
    on the k-th. A gradient with a NaN or Inf anywhere is skipped: zero
    updates, unchanged state; read `bad_step_count(opt_state)`.

  Raises:
    ValueError: for an unknown `config.optimizer.name` or `schedule`, or
      `config.optimizer.grad_accum_steps < 1`.
  """
  if opt_config.name not in OPTIMIZERS:
    raise ValueError(
        f"Unknown config.optimizer.name {opt_config.name!r}; valid choices: "
        f"{', '.join(OPTIMIZERS)}.")
  accum = int(opt_config.grad_accum_steps)
  if accum < 1:
    raise ValueError(
        f"config.optimizer.grad_accum_steps must be >= 1, got {accum}.")

  schedule = learning_rate_schedule(opt_config, total_steps)
  if opt_config.name == "adamw" and accum == 1 and opt_config.fused:
    return fused_adamw(
        schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
        weight_decay=float(opt_config.weight_decay), mask=weight_decay_mask,
        clip_norm=float(opt_config.grad_clip_norm))
  parts = []
  if opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)))
  parts.append(_base_optimizer(opt_config, schedule))
  tx = optax.chain(*parts)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
  return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_APPLY_NON_FINITE)


def _finite_state_field(opt_state, field):
  """Reads one field of the `ApplyIfFiniteState` inside `opt_state`."""
  found = optax.tree.get(opt_state, field)
  if found is None:
    raise ValueError(
        f"No {field!r} in the optimizer state: it was not built by "
        "`build_optimizer` (no optax.apply_if_finite wrapper).")
  # Under `nnx.Optimizer` the value is an `OptState` variable holding the
  # array; as a pytree it has that array as its only leaf.
  return jax.tree.leaves(found)[0]


def bad_step_count(opt_state):
  """Consecutive non-finite gradients skipped up to now.

  Reset to 0 by the next finite gradient; the trainer stops the run when it
  reaches `config.max_bad_steps`. With gradient accumulation it counts
  micro-batches.

  Args:
    opt_state: the state of a `build_optimizer` transformation, as a raw optax
      state or as `nnx.Optimizer.opt_state`.

  Returns:
    An int32 scalar array (usable inside `jit`).
  """
  return _finite_state_field(opt_state, "notfinite_count")


def total_bad_steps(opt_state):
  """Non-finite gradients skipped since the optimizer was initialised.

  Args:
    opt_state: the state of a `build_optimizer` transformation, as a raw optax
      state or as `nnx.Optimizer.opt_state`.

  Returns:
    An int32 scalar array; never reset.
  """
  return _finite_state_field(opt_state, "total_notfinite")


def steps_from_config(config, steps_per_epoch):
  """Number of optimizer updates in the run.

  BERT fine-tuning recipes are given in epochs (with warmup as a proportion),
  pre-training ones in steps; the config holds both and `total_steps` wins
  when positive.

  Args:
    config: the full config; reads `total_steps`, `num_epochs` and
      `optimizer.grad_accum_steps`.
    steps_per_epoch: batches the training loader yields per epoch, i.e.
      `tx.update` calls per epoch (micro-batches when
      `grad_accum_steps > 1`).

  Returns:
    `config.total_steps` when > 0 (it is counted in updates); otherwise
    `floor(num_epochs * steps_per_epoch / grad_accum_steps)`, at least 1. An
    incomplete trailing accumulation would make no update, so it is not
    counted; the loop runs `updates * grad_accum_steps` micro-batches.

  Raises:
    ValueError: if neither `config.total_steps` nor `config.num_epochs` is
      positive, or `steps_per_epoch` is not positive.
  """
  if config.total_steps > 0:
    return int(config.total_steps)
  if config.num_epochs <= 0:
    raise ValueError(
        "Set config.total_steps > 0 or config.num_epochs > 0; got "
        f"total_steps={config.total_steps}, num_epochs={config.num_epochs}.")
  if steps_per_epoch <= 0:
    raise ValueError(
        f"steps_per_epoch must be positive, got {steps_per_epoch} (is the "
        "training set empty or smaller than config.batch_size?).")
  accum = int(config.optimizer.grad_accum_steps)
  if accum < 1:
    raise ValueError(
        f"config.optimizer.grad_accum_steps must be >= 1, got {accum}.")
  # The small epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
  micro_batches = math.floor(config.num_epochs * steps_per_epoch + 1e-6)
  return max(1, micro_batches // accum)
