"""AdaLoRA's rank allocation as an optax wrapper (Zhang et al. 2023).

PEFT's `RankAllocator.update_and_allocate(model, global_step)`, called after
each optimiser step, rewritten as a transformation around the optimiser, so
that its state (the smoothed importances and the final rank pattern) lives
in the optimiser state: it is sharded, donated and checkpointed with it, and
a resumed run allocates exactly as an uninterrupted one.

After update t (1-based; PEFT's `global_step`):
  - t < total - tfinal: importance of every entry of P, Lambda, Q,
    I = |w * g| (w after the update), smoothed: ipt = b1 ipt + (1 - b1) I,
    unc = b2 unc + (1 - b2) |I - ipt|; a triplet's score is
    ipt*unc of its lambda plus the means of its row of P and column of Q;
  - on the masking steps of `budget_schedule` (every deltaT after tinit),
    the lowest-scoring triplets beyond the budget get lambda = 0;
  - t == total - tfinal: the target budget, masked by the last scores; that
    mask is the final rank pattern, applied after every later update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def budget_schedule(step: int, init_budget: int, target_budget: int, *,
                    tinit: int, tfinal: int, total_step: int, delta_t: int):
  """(budget, mask now?) after update `step`, as PEFT's `budget_schedule`.

  The budget (ranks kept over all layers) stays at `init_budget` for the
  first `tinit` updates, falls cubically to `target_budget` at update
  `total_step - tfinal`, and stays there.
  """
  if step <= tinit:
    return init_budget, False
  if step > total_step - tfinal:
    return target_budget, True
  mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
  budget = int((init_budget - target_budget) * (mul ** 3) + target_budget)
  return budget, step % delta_t == 0


class AllocationState(NamedTuple):
  inner: Any        # the wrapped optimiser's state
  step: jax.Array   # int32: updates so far
  ipt: dict         # {leaf name: smoothed importance}, for every P, Lambda, Q
  unc: dict         # {leaf name: smoothed uncertainty}
  pattern: dict     # {Lambda leaf name: bool [r]}: the final rank pattern


def _name(path) -> str:
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
      continue  # an nnx.Variable's own leaf
    keys.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(keys)


def named_leaves(tree) -> dict:
  """{'/'-joined path: leaf} of a pytree (nnx.State or dicts)."""
  return {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def triplets(names) -> dict:
  """{layer prefix: (P name, Lambda name, Q name)} of AdaLoRA's leaves."""
  out = {}
  for name in names:
    if name.endswith("/lora_e"):
      prefix = name[:-len("lora_e")]
      out[prefix] = (prefix + "lora_a", name, prefix + "lora_b")
  return out


def scores(ipt, unc, triple):
  """A layer's triplet scores [r] (PEFT's `_element_score`, `_combine_ipt`)."""
  a, e, b = ((ipt[n] * unc[n]) for n in triple)
  return e + a.mean(axis=0) + b.mean(axis=1)  # A [in, r], B [r, out]


def adalora_allocation(inner: optax.GradientTransformation, *, init_r: int,
                       target_r: int, tinit: int, tfinal: int, delta_t: int,
                       total_step: int, beta1: float, beta2: float
                       ) -> optax.GradientTransformation:
  """`inner`, then AdaLoRA's importance tracking and masking of Lambda.

  Args:
    inner: the optimiser (its updates of masked entries are replaced so
      that the entry becomes exactly 0).
    init_r, target_r: ranks per layer at the start and the end; the budgets
      are these times the number of AdaLoRA layers.
    tinit, tfinal, delta_t, total_step: PEFT's schedule (`budget_schedule`).
    beta1, beta2: smoothing of the importance and its uncertainty.
  """
  # Per-step budgets and mask flags, precomputed on the host in Python's
  # arithmetic, so the in-graph schedule is PEFT's to the integer.
  def table(n_layers):
    rows = [budget_schedule(t, init_r * n_layers, target_r * n_layers,
                            tinit=tinit, tfinal=tfinal, total_step=total_step,
                            delta_t=delta_t) for t in range(total_step + 2)]
    return (jnp.asarray(np.array([r[0] for r in rows], np.int32)),
            jnp.asarray(np.array([r[1] for r in rows], bool)))

  def init(params):
    named = named_leaves(params)
    found = triplets(named)
    if not found:
      raise ValueError("AdaLoRA's rank allocation found no lora_e weights "
                       "among the trained parameters")
    zeros = lambda: {n: jnp.zeros_like(named[n]) for t in found.values() for n in t}  # pylint: disable=unnecessary-lambda-assignment
    # Two sets of buffers: the state is donated, and a buffer may be donated once.
    return AllocationState(
        inner=inner.init(params), step=jnp.zeros((), jnp.int32),
        ipt=zeros(), unc=zeros(),
        pattern={e: jnp.ones(named[e].shape, bool) for _, e, _ in found.values()})

  def update(grads, state, params):
    updates, inner_state = inner.update(grads, state.inner, params)
    t = state.step + 1
    named_p, named_g = named_leaves(params), named_leaves(grads)
    named_u = named_leaves(updates)
    found = triplets(named_p)
    budgets, mask_now = table(len(found))
    t_idx = jnp.minimum(t, total_step + 1)
    new = {n: named_p[n] + named_u[n] for n in state.ipt}
    finite = jnp.all(jnp.stack([jnp.isfinite(named_g[n]).all() for n in state.ipt]))
    # Importance: only before the final phase, and only from finite steps.
    track = (t < total_step - tfinal) & finite
    ipt, unc = {}, {}
    for n in state.ipt:
      now = jnp.abs(new[n] * named_g[n])
      avg = beta1 * state.ipt[n] + (1 - beta1) * now
      var = beta2 * state.unc[n] + (1 - beta2) * jnp.abs(now - avg)
      ipt[n] = jnp.where(track, avg, state.ipt[n])
      unc[n] = jnp.where(track, var, state.unc[n])
    s = {e: scores(ipt, unc, trip) for trip in found.values() for e in [trip[1]]}
    flat = jnp.concatenate([s[e] for e in sorted(s)])
    k = sum(x.size for x in s.values()) - budgets[t_idx]  # triplets to drop
    # PEFT: kthvalue(k) and mask score <= it; k == 0 masks nothing.
    threshold = jnp.where(k > 0, jnp.sort(flat)[jnp.maximum(k - 1, 0)], -jnp.inf)
    final = t == total_step - tfinal
    by_score = (t < total_step - tfinal) & mask_now[t_idx] | final
    after = t > total_step - tfinal
    pattern, keep = {}, {}
    for e in s:
      scored = s[e] > threshold
      keep[e] = jnp.where(by_score, scored,
                          jnp.where(after, state.pattern[e], True))
      pattern[e] = jnp.where(final, scored, state.pattern[e])
    # The final pattern is fixed; PEFT then resets the importances.
    ipt = {n: jnp.where(final, 0.0, v) for n, v in ipt.items()}
    unc = {n: jnp.where(final, 0.0, v) for n, v in unc.items()}

    def masked(path, u, p):
      name = _name(path)
      if name not in keep:
        return u
      return jnp.where(keep[name], u, -p)  # p + (-p) == 0 exactly

    updates = jax.tree_util.tree_map_with_path(masked, updates, params)
    return updates, AllocationState(inner_state, t, ipt, unc, pattern)

  return optax.GradientTransformation(init, update)


def rank_pattern(opt_state) -> dict:
  """{Lambda leaf name: bool [r]} of the final pattern in an optimiser state."""
  found = []

  def visit(x):
    if isinstance(x, AllocationState):
      found.append(x)
      return True
    return False

  jax.tree_util.tree_map(lambda x: x, opt_state, is_leaf=visit)
  if not found:
    raise ValueError("no AdaLoRA allocation state in this optimiser state")
  return found[0].pattern
