"""The sparsity schedule and the masks' updates, as an optax wrapper.

Zhu & Gupta (2017), "To prune, or not to prune", eq. 1: from update t0 on,
every dt updates for n steps, the sparsity goes from s_i to s_f as

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3

fast at first, while redundant weights abound, then slowly. Movement pruning
(Sanh et al. 2020) uses the same cubic schedule for its Top-v masks.

`pruning(inner, ...)` wraps the run's optimiser. The masks
(`layers.PruningMask`, in the trained parameters) are hidden from `inner`
(no moments, no weight decay); after each update t the
wrapper, on the schedule's steps, recomputes each layer's mask as the
`round(s_t * size)` smallest entries of a score set to 0:

  magnitude  |W| after the update (Zhu & Gupta), with the weights already
             pruned scored below every kept one: sparsity never falls and a
             pruned weight never returns. The pruned weights are set to
             exactly 0 after every update (`p + (-p) == 0`), so the kernel
             itself is the pruned one (export and benchmarks read it).
  movement   the scores S after the update (Sanh et al.'s Top-v: a pruned
             weight returns when its score rises). After the schedule's last
             step the mask is fixed and the pruned weights are set to 0, as
             for magnitude pruning.

The masks are parameters and the step count is in this wrapper's state, so
both are checkpointed with the run: a resumed run prunes exactly as an
uninterrupted one. Ties are broken by position (a stable sort), so every
layer keeps exactly `size - round(s_t * size)` weights (`keep_top`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.methods.pruning import layers

MASK, SCORES, KERNEL = "pruning_mask", "pruning_scores", "kernel"


def cubic_sparsity(step: int, final: float, *, initial: float = 0.0,
                   begin: int, end: int) -> float:
  """Zhu & Gupta's s_t after update `step`: `initial` until `begin`, `final`
  from `end` on, the cubic in between."""
  if step < begin:
    return 0.0
  if step >= end:
    return final
  return final + (initial - final) * (1.0 - (step - begin) / (end - begin)) ** 3


def mask_steps(total: int, *, begin: int, end: int, frequency: int) -> np.ndarray:
  """bool [total + 2]: whether the masks are recomputed after update t:
  t = begin + j * frequency up to `end`, and `end` itself."""
  t = np.arange(total + 2)
  return ((t >= begin) & (t <= end) & ((t - begin) % frequency == 0)) | (t == end)


def _name(path) -> str:
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
      continue  # an nnx.Variable's own leaf
    keys.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(keys)


def _named(tree) -> dict:
  return {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _order_key(x: jax.Array) -> jax.Array:
  """int32 keys in the order of the float32 values (IEEE bits, negatives
  flipped)."""
  x = jnp.where(x == 0, 0.0, x.astype(jnp.float32))  # -0.0 ties with 0.0
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def keep_top(scores: jax.Array, keep: jax.Array) -> jax.Array:
  """0/1 mask of the `keep` largest scores (a traced count); ties by position.

  The keep-th largest value is found by bisection on the values' int32 keys
  (32 counting passes), not by sorting: on XLA:CPU sorting MiniLM's 10.6M
  weights took 8 s, these passes 1 s.
  """
  key = _order_key(scores.reshape(-1))

  def step(_, bounds):  # the largest t with count(key >= t) >= keep
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2)
    ok = jnp.sum(key >= mid, dtype=jnp.int32) >= keep
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  bounds = (jnp.int32(jnp.iinfo(jnp.int32).min), jnp.int32(jnp.iinfo(jnp.int32).max))
  threshold, _ = jax.lax.fori_loop(0, 32, step, bounds)
  above = key > threshold
  tied = key == threshold
  room = keep - jnp.sum(above, dtype=jnp.int32)
  kept = above | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= room))
  return kept.astype(scores.dtype).reshape(scores.shape)


class PruningState(NamedTuple):
  inner: Any       # the wrapped optimiser's state (masks hidden from it)
  step: jax.Array  # int32: updates so far


def pruning(inner: optax.GradientTransformation, *, final: float,
            initial: float = 0.0, begin: int, end: int, frequency: int,
            total_steps: int, movement: bool) -> optax.GradientTransformation:
  """`inner`, then the masks' schedule (see the module docstring).

  Args:
    inner: the run's optimiser.
    final, initial: the sparsity s_f reached at `end`, and s_i at `begin`.
    begin, end: the first and last update of the schedule (t0, t0 + n dt).
    frequency: dt, updates between two mask updates.
    total_steps: the run's updates (the tables' length; later updates keep
      the last mask).
    movement: the scores decide the mask (Sanh et al.), else |W|.
  """
  if not 0.0 <= initial <= final < 1.0:
    raise ValueError(f"sparsities must satisfy 0 <= initial ({initial}) <= "
                     f"final ({final}) < 1")
  if not 0 <= begin <= end or frequency < 1:
    raise ValueError(f"need 0 <= begin ({begin}) <= end ({end}) and "
                     f"frequency ({frequency}) >= 1")
  sparsity = np.array([cubic_sparsity(t, final, initial=initial, begin=begin,
                                      end=end) for t in range(total_steps + 2)])
  recompute = mask_steps(total_steps, begin=begin, end=end, frequency=frequency)

  # The masks are split off before `inner` sees the parameters (the state
  # stays an nnx.State of Variables, so its moments keep their logical axes;
  # optax.masked's MaskedNode inside a Variable would not shard).
  def weights(tree):
    return nnx.split_state(tree, nnx.Not(layers.PruningMask), ...)[0]

  def init(params):
    if not any(n.endswith("/" + MASK) for n in _named(params)):
      raise ValueError("pruning found no pruning_mask among the trained "
                       "parameters (no PrunedDense layer was built)")
    return PruningState(inner.init(weights(params)), jnp.zeros((), jnp.int32))

  def update(grads, state, params):
    updates, inner_state = inner.update(weights(grads), state.inner,
                                        weights(params))
    masks = nnx.split_state(params, layers.PruningMask, ...)[0]
    updates = nnx.merge_state(updates, jax.tree.map(jnp.zeros_like, masks))
    t = state.step + 1
    t_idx = jnp.minimum(t, total_steps + 1)
    named_p, named_u = _named(params), _named(updates)
    new_updates = {}
    for name in named_p:
      if not name.endswith("/" + MASK):
        continue
      prefix = name[:-len(MASK)]
      mask, kernel = named_p[name], named_p[prefix + KERNEL]
      new_kernel = kernel + named_u[prefix + KERNEL]
      if movement:
        score = named_p[prefix + SCORES] + named_u[prefix + SCORES]
      else:  # the pruned weights stay below every kept one
        score = jnp.where(mask > 0, jnp.abs(new_kernel), -1.0)
      # Host-side arithmetic per size: the count is exact, not a float's.
      pruned = np.round(sparsity * mask.size).astype(np.int32)
      keep = mask.size - jnp.asarray(pruned)[t_idx]
      new_mask = jax.lax.cond(jnp.asarray(recompute)[t_idx],
                              lambda s=score, k=keep: keep_top(s, k),
                              lambda m=mask: m)
      new_updates[name] = new_mask - mask  # 0/1 - 0/1: exact
      zero = (t >= end) if movement else True
      new_updates[prefix + KERNEL] = jnp.where(
          zero & (new_mask == 0), -kernel, named_u[prefix + KERNEL])

    def replace(path, u):
      return new_updates.get(_name(path), u)

    updates = jax.tree_util.tree_map_with_path(replace, updates)
    return updates, PruningState(inner_state, t)

  return optax.GradientTransformation(init, update)
