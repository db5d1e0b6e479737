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
"""

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
