"""The jitted update and evaluation steps, built from their pieces.

The update takes what it runs as arguments: a loss function (the task's,
possibly wrapped by methods), a gradient function (`jax.value_and_grad` by
default; a method may replace it, e.g. with per-example gradients), and an
optional per-step batch transform (dynamic MLM masking). The strategy (jit or
shard_map) only decides how gradients are reduced. Nothing here knows a task.

The loss-function contract:

  loss_fn(trainable, frozen, batch, key) -> (loss, aux)

`loss` is the weighted mean over the batch it is given, `aux["weight"]` the
total weight that mean divides by (examples, labelled tokens, masked
positions); a task's `aux` may carry more (`outputs`, the model's raw
outputs, which SMART compares). Under jit the batch is the global batch; under shard_map each
device's share is re-weighted by `weight / global weight` before the psum, so
every strategy gives the same gradient.

The transform runs here, in the jitted step, not on the host: its key is a
function of (seed, step) like dropout's, so resuming is exact with no
generator state to checkpoint; its draws do not depend on how the global
batch is split over hosts (`jax_threefry_partitionable`); and a few
element-wise ops on [B, L] cost nothing on an accelerator, while the host's
Python pipeline is what must keep up with it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from research import parallelism
from research.training import optimizers

# The transform's key stream, apart from dropout's: `nnx.Rngs(dropout=k)`
# draws fold_in(k, 0), fold_in(k, 1), ... (one per dropout call), which
# never reaches this constant.
TRANSFORM_STREAM = 0x7FFFFFFF
# Evaluation keys (transforms only: evaluation has no dropout).
EVAL_STREAM = 0x7FFFFFFE


PRNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")


def root_key(config):
  """The run's root key: `config.seed` under `config.prng_impl` (threefry;
  rbg and unsafe_rbg draw dropout masks faster on accelerators, as T5X and
  MaxText use them). Every key of a step is folded from it, so a resumed run
  draws the same masks under any of them."""
  impl = config.get("prng_impl", "threefry")
  return jax.random.key(config.seed, impl={"threefry": "threefry2x32"}.get(
      impl, impl))


def _key(seed):
  return seed if isinstance(seed, jax.Array) else jax.random.key(seed)


def value_and_grad(loss_fn):
  """The default gradient function: `((loss, aux), grads)` of `loss_fn`."""
  return jax.value_and_grad(loss_fn, has_aux=True)


@dataclasses.dataclass(frozen=True)
class StepGradFn:
  """A gradient function that is given the micro-step and reduces over devices.

  What `grad_fn(loss_fn)` returns when the gradient needs more than the
  batch and a per-device key (DP-SGD: noise drawn once per logical batch
  from the step, added after the all-reduce):

    fn(params, frozen, batch, key, *, micro_step, axis_name)
        -> ((loss, aux), grads)

  `micro_step` is the same on every device. Under `strategy="pmap"`,
  `axis_name` names the data axes and `fn` returns the global mean loss and
  gradient, the same on every device: the step adds no reduction of its own.
  Under jit `axis_name` is None (one global program). Scalars in
  `aux["metrics"]` (global: the same on every device) join the step's
  metrics under their names (DP-SGD's clipping statistics); the training
  loop logs them.
  """
  fn: Callable


def make_train_step(tx, loss_fn, *, seed, mesh, strategy, state_sharding,
                    frozen_sharding, grad_fn=value_and_grad, transform=None):
  """The jitted update: `(state, frozen, batch, micro_step) -> (state, metrics)`.

  Args:
    tx: the optax transformation (`optimizers.build_optimizer`).
    loss_fn: `(trainable, frozen, batch, key) -> (loss, aux)`, see the module
      docstring.
    seed: an int or a key (`root_key`); dropout keys are `fold_in(key,
      micro_step)` (per device, also folded with its index under
      shard_map): a resumed run draws the same masks.
    mesh: the device mesh.
    strategy: "jit" (sharded program) or "pmap" (per-device program with an
      explicit gradient all-reduce, via shard_map).
    state_sharding: NamedShardings of `{"params", "opt_state"}` (the
      trainable parameters and their optimiser state; donated).
    frozen_sharding: NamedShardings of `frozen` (not donated).
    grad_fn: `loss_fn -> ((loss, aux), grads) function`, by default
      `jax.value_and_grad(loss_fn, has_aux=True)`, or `loss_fn ->
      StepGradFn` (see there).
    transform: `(batch, key) -> batch`, applied before the loss with
      `key = fold_in(fold_in(key(seed), micro_step), TRANSFORM_STREAM)`;
      None: no transform.

  Returns:
    The jitted step. `metrics` holds `loss`, `grad_norm` and `bad_steps`
    (consecutive non-finite updates skipped), and a `StepGradFn`'s
    `aux["metrics"]`.
  """
  batch_sharding = parallelism.batch_sharding(mesh)
  replicated = parallelism.replicated(mesh)
  value_and_grads = grad_fn(loss_fn)
  reduces = isinstance(value_and_grads, StepGradFn)

  def forward_backward(state, frozen, batch, key, micro_step, axis_name=None):
    if transform is not None:
      batch = transform(batch, jax.random.fold_in(key, TRANSFORM_STREAM))
    if reduces:
      return value_and_grads.fn(state["params"], frozen, batch, key,
                                micro_step=micro_step, axis_name=axis_name)
    return value_and_grads(state["params"], frozen, batch, key)

  def apply(state, loss, grads, extra=None):
    # The optimiser skips (and counts) a step whose gradients hold a NaN or
    # Inf; a loss that overflows while its gradients stay finite (a squared
    # error of a huge label) must be skipped too, so it poisons them. One
    # leaf suffices (both optimiser paths test every leaf or the global
    # norm): the smallest, since a select over every leaf costs a pass over
    # the 47 MB word-embedding gradient (1-3% of a MiniLM step on CPU).
    leaves, treedef = jax.tree.flatten(grads)
    i = min(range(len(leaves)), key=lambda j: leaves[j].size)
    leaves[i] = jnp.where(jnp.isfinite(loss), leaves[i], jnp.nan)
    grads = jax.tree.unflatten(treedef, leaves)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {
        "loss": loss, "grad_norm": optax.tree.norm(grads),
        "bad_steps": optimizers.bad_step_count(opt_state), **(extra or {})}

  def step_metrics(aux):
    """A StepGradFn's own global metrics (see there); none otherwise."""
    return dict(aux.get("metrics", {})) if reduces else {}

  if strategy == "jit":
    def step(state, frozen, batch, micro_step, base_key):
      key = jax.random.fold_in(base_key, micro_step)
      (loss, aux), grads = forward_backward(state, frozen, batch, key,
                                            micro_step)
      return apply(state, loss, grads, step_metrics(aux))
  else:
    axes = parallelism.BATCH_AXES

    def per_device(state, frozen, batch, micro_step, base_key):
      key = jax.random.fold_in(jax.random.fold_in(base_key, micro_step),
                               jax.lax.axis_index(axes))
      (loss, aux), grads = forward_backward(state, frozen, batch, key,
                                            micro_step, axes)
      if reduces:  # already the global mean (StepGradFn)
        return apply(state, loss, grads, step_metrics(aux))
      # Each device's mean counts by its share of the global weight; the
      # psum is the gradient all-reduce.
      share = aux["weight"] / jnp.maximum(jax.lax.psum(aux["weight"], axes),
                                          1.0)
      loss, grads = jax.lax.psum(
          jax.tree.map(lambda x: x * share.astype(x.dtype), (loss, grads)),
          axes)
      return apply(state, loss, grads)

    # check_vma=False: with it on, JAX would already sum the gradients of
    # the replicated parameters in the transpose, and the psum above would
    # count them once per device. Off, the program is the classic pmap one.
    step = jax.shard_map(per_device, mesh=mesh,
                         in_specs=(jax.P(), jax.P(), jax.P(axes), jax.P(),
                                   jax.P()),
                         out_specs=(jax.P(), jax.P()), check_vma=False)
  return AheadOfTime(jax.jit(
      step, in_shardings=(state_sharding, frozen_sharding, batch_sharding,
                          None, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=0),
      key=jax.device_put(_key(seed), replicated))


def make_eval_step(forward, *, seed, mesh, params_sharding, frozen_sharding,
                   transform=None):
  """The jitted evaluation: `(params, frozen, batch, index) -> outputs`.

  Args:
    forward: `(params, frozen, batch) -> dict of arrays` (the task's
      evaluation forward: loss sums, predictions, ...), no dropout.
    seed: with `index` (the evaluation batch), the transform's key:
      `fold_in(fold_in(key(seed), EVAL_STREAM), index)`, the same at every
      evaluation, so evaluations compare.
    mesh: the device mesh.
    params_sharding, frozen_sharding: shardings of the two parameter parts.
    transform: the task's `(batch, key) -> batch`, or None.

  Returns:
    The jitted step; its outputs are replicated (every host reads them).
  """
  replicated = parallelism.replicated(mesh)

  def step(params, frozen, batch, index, base_key):
    if transform is not None:
      key = jax.random.fold_in(jax.random.fold_in(base_key, EVAL_STREAM),
                               index)
      batch = transform(batch, key)
    return forward(params, frozen, batch)

  return AheadOfTime(jax.jit(
      step, in_shardings=(params_sharding, frozen_sharding,
                          parallelism.batch_sharding(mesh), None, replicated),
      out_shardings=replicated), key=jax.device_put(_key(seed), replicated))


class AheadOfTime:
  """A jitted step and the executables compiled ahead for batch shapes.

  `compile_ahead` traces and lowers each batch shape once and compiles them
  on a pool of threads (XLA compiles outside the GIL, so shapes compile in
  parallel on as many cores as there are). A call whose batch has a
  compiled shape runs that executable directly: no second trace, which a
  plain `jax.jit` call after `.lower().compile()` would do. Other shapes
  fall back to the jitted function.

  The run's root key is the step's last argument, bound here: a key closed
  over would be a constant of the program, and a run with another seed
  would then miss the persistent compilation cache (a few-shot protocol's
  five splits compiled five times).
  """

  def __init__(self, jitted, key):
    self.jitted = jitted
    self.key = key
    self.executables = {}
    self.lock = threading.Lock()

  @staticmethod
  def shape_key(batch):
    return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))

  def __call__(self, first, frozen, batch, index):
    executable = self.executables.get(self.shape_key(batch))
    if executable is None:
      return self.jitted(first, frozen, batch, index, self.key)
    return executable(first, frozen, batch, index, self.key)

  def lower(self, *args):
    return self.jitted.lower(*args, self.key)

  def compile_ahead(self, calls, workers=None) -> dict:
    """Compiles the step for each `(first, frozen, batch, index)` of `calls`
    whose batch shape has no executable yet. Tracing and lowering run one
    after the other (Python), the XLA compilations on `workers` threads
    (default: one per core).

    Returns:
      {"shapes": compiled now, "trace_seconds": tracing and lowering,
      "compile_seconds": wall time of the compilations}.
    """
    t0 = time.perf_counter()
    lowered = {}
    for args in calls:
      key = self.shape_key(args[2])
      if key not in self.executables and key not in lowered:
        lowered[key] = self.lower(*args)
    t1 = time.perf_counter()
    workers = workers or max(1, min(len(lowered), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      done = dict(zip(lowered, pool.map(lambda low: low.compile(),
                                        lowered.values())))
    with self.lock:
      self.executables.update(done)
    return {"shapes": len(done), "trace_seconds": t1 - t0,
            "compile_seconds": time.perf_counter() - t1}

  def _cache_size(self) -> int:
    """Batch shapes met: compiled ahead or traced by the jitted function."""
    return len(self.executables) + self.jitted._cache_size()  # pylint: disable=protected-access


def precompile(train_step, state, frozen, batcher, batch_sharding, start,
               count):
  """Compiles `train_step` for every batch width of micro-batches [start, +count).

  The widths come from the data plan (`Batcher.planned_widths`), so a bucket
  first met late in the run (a rare long batch, packed rows) does not stall
  every host with a compile there; the widths compile in parallel
  (`AheadOfTime.compile_ahead`), and the steps later run those executables
  without tracing again. Lowering reads the arguments' shapes and shardings
  only: `state` is not donated here.

  Returns:
    `compile_ahead`'s {"shapes", "trace_seconds", "compile_seconds"}.
  """
  widths = batcher.planned_widths(start, count)
  calls = [(state, frozen, parallelism.shard_batch(batcher.batch_at(step),
                                                   batch_sharding), step)
           for step in widths.values()]
  return train_step.compile_ahead(calls)
