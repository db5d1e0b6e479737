"""Tests for research.training.optimizers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.configs import default
from research.training import optimizers


def _opt_config(**overrides):
  config = default.get_config()
  for key, value in overrides.items():
    setattr(config.optimizer, key, value)
  return config.optimizer


def _params():
  rng = np.random.default_rng(0)
  return {
      "embeddings": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
      "dense": {
          "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
      },
      "LayerNorm": {
          "scale": jnp.asarray(1.0 + rng.normal(size=(3,)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
      },
  }


def _grads(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32),
      _params())


def _step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol)


# --- Schedules ---------------------------------------------------------------


def test_linear_schedule_bert():
  s = optimizers.learning_rate_schedule(
      _opt_config(learning_rate=1.0, warmup_proportion=0.1), 100)
  np.testing.assert_allclose(
      [s(0), s(5), s(10), s(55), s(100)], [0.0, 0.5, 1.0, 0.5, 0.0],
      atol=1e-6)


def test_warmup_steps_override_proportion():
  s = optimizers.learning_rate_schedule(
      _opt_config(learning_rate=2.0, warmup_proportion=0.1, warmup_steps=20),
      100)
  np.testing.assert_allclose(
      [s(0), s(10), s(20), s(60), s(100)], [0.0, 1.0, 2.0, 1.0, 0.0],
      atol=1e-6)


def test_cosine_schedule():
  s = optimizers.learning_rate_schedule(
      _opt_config(learning_rate=1.0, schedule="cosine", warmup_steps=10), 110)
  quarter = 0.5 * (1 + math.cos(math.pi / 4))
  np.testing.assert_allclose(
      [s(0), s(10), s(35), s(60), s(110)], [0.0, 1.0, quarter, 0.5, 0.0],
      atol=1e-6)


def test_constant_schedule_and_no_warmup():
  s = optimizers.learning_rate_schedule(
      _opt_config(learning_rate=3.0, schedule="constant", warmup_steps=4), 50)
  np.testing.assert_allclose([s(0), s(2), s(4), s(50)], [0.0, 1.5, 3.0, 3.0])
  s = optimizers.learning_rate_schedule(
      _opt_config(learning_rate=3.0, warmup_steps=0), 30)
  np.testing.assert_allclose([s(0), s(15), s(30)], [3.0, 1.5, 0.0], atol=1e-6)


def test_schedule_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config\.optimizer\.schedule.*linear, "
                     r"cosine, constant"):
    optimizers.learning_rate_schedule(_opt_config(schedule="step"), 10)
  with pytest.raises(ValueError, match=r"config\.optimizer\.warmup_steps"):
    optimizers.learning_rate_schedule(_opt_config(warmup_steps=11), 10)
  with pytest.raises(ValueError, match="total_steps"):
    optimizers.learning_rate_schedule(_opt_config(), 0)


# --- Weight-decay mask ---------------------------------------------------------


def test_adamw_decays_only_matrices():
  lr, wd = 0.1, 0.5
  tx = optimizers.build_optimizer(
      _opt_config(learning_rate=lr, weight_decay=wd, schedule="constant",
                  warmup_steps=0), 10)
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  new, _ = _step(tx, params, tx.init(params), zero)
  # Zero gradient: the Adam part is 0, only decoupled decay lr * wd * p moves.
  for key in ("embeddings",):
    np.testing.assert_allclose(new[key], params[key] * (1 - lr * wd), 1e-6)
  np.testing.assert_allclose(
      new["dense"]["kernel"], params["dense"]["kernel"] * (1 - lr * wd), 1e-6)
  for path in (("dense", "bias"), ("LayerNorm", "scale"),
               ("LayerNorm", "bias")):
    np.testing.assert_array_equal(new[path[0]][path[1]],
                                  params[path[0]][path[1]])


@pytest.mark.parametrize("name", ["lamb", "adafactor"])
def test_other_optimizers_decay_only_matrices(name):
  tx = optimizers.build_optimizer(
      _opt_config(name=name, learning_rate=0.1, weight_decay=0.5,
                  schedule="constant", warmup_steps=0), 10)
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  new, _ = _step(tx, params, tx.init(params), zero)
  for old, upd in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
    if old.ndim >= 2:
      assert float(jnp.linalg.norm(upd)) < 0.99 * float(jnp.linalg.norm(old))
    else:
      np.testing.assert_array_equal(upd, old)


def test_mask_on_nnx_state():
  class Tiny(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 2, rngs=rngs)
      self.norm = nnx.LayerNorm(2, rngs=rngs)

  model = Tiny(nnx.Rngs(0))
  mask = optimizers.weight_decay_mask(nnx.state(model, nnx.Param))
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(mask)}
  flat = {k: jax.tree.leaves(v)[0] for k, v in flat.items()}
  assert flat == {"dense/kernel": True, "dense/bias": False,
                  "norm/scale": False, "norm/bias": False}


# --- Gradient accumulation -----------------------------------------------------


def test_multisteps_equals_one_step_on_mean_gradient():
  common = dict(learning_rate=0.05, weight_decay=0.01, warmup_steps=1,
                grad_clip_norm=1.0)
  k = 3
  accumulated = optimizers.build_optimizer(
      _opt_config(grad_accum_steps=k, **common), 10)
  # optax's chain, so that the states have the same structure.
  single = optimizers.build_optimizer(_opt_config(fused=False, **common), 10)
  params = _params()
  micro = [_grads(seed, scale=2.0) for seed in range(2 * k)]

  p_acc, s_acc = params, accumulated.init(params)
  p_one, s_one = params, single.init(params)
  for update in range(2):
    chunk = micro[update * k:(update + 1) * k]
    for i, g in enumerate(chunk):
      before = p_acc
      p_acc, s_acc = _step(accumulated, p_acc, s_acc, g)
      if i < k - 1:
        _assert_trees_equal(p_acc, before)
    mean = jax.tree.map(lambda *gs: sum(gs) / k, *chunk)
    p_one, s_one = _step(single, p_one, s_one, mean)
    _assert_trees_close(p_acc, p_one)
  # The moments match too (the mean gradient is clipped, not each part).
  inner_acc = s_acc.inner_state.inner_opt_state
  _assert_trees_close(inner_acc, s_one.inner_state)


# --- Non-finite gradients ------------------------------------------------------


def _moments(state):
  return optax.tree.get(state, "mu"), optax.tree.get(state, "nu")


@pytest.mark.parametrize("accum", [1, 2])
def test_nan_gradient_is_skipped_and_counted(accum):
  tx = optimizers.build_optimizer(
      _opt_config(learning_rate=0.1, warmup_steps=0, grad_accum_steps=accum),
      10)
  params = _params()
  state = tx.init(params)
  for seed in range(accum):  # one real update first: moments are non-zero
    params, state = _step(tx, params, state, _grads(seed))
  assert float(jnp.abs(_moments(state)[0]["embeddings"]).sum()) > 0

  bad = _grads(10)
  bad["dense"]["bias"] = bad["dense"]["bias"].at[1].set(jnp.nan)
  inf = _grads(11)
  inf["embeddings"] = inf["embeddings"].at[0, 0].set(jnp.inf)
  for expected, g in enumerate([bad, inf], start=1):
    new_params, new_state = _step(tx, params, state, g)
    _assert_trees_equal(new_params, params)
    _assert_trees_equal(_moments(new_state), _moments(state))
    if accum > 1:  # the MultiSteps accumulator and counters too
      _assert_trees_equal(new_state.inner_state, state.inner_state)
    else:  # fused_adamw: Adam's step count
      assert int(new_state.count) == int(state.count) == 1
    assert int(optimizers.bad_step_count(new_state)) == expected
    assert int(optimizers.total_bad_steps(new_state)) == expected
    params, state = new_params, new_state

  for seed in range(20, 20 + accum):
    new_params, state = _step(tx, params, state, _grads(seed))
  assert int(optimizers.bad_step_count(state)) == 0
  assert int(optimizers.total_bad_steps(state)) == 2
  assert not np.allclose(new_params["embeddings"], params["embeddings"])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(new_params))


def test_nan_micro_batch_does_not_poison_accumulation():
  tx = optimizers.build_optimizer(
      _opt_config(learning_rate=0.1, warmup_steps=0, grad_accum_steps=2), 10)
  params = _params()
  nan = jax.tree.map(lambda g: g * jnp.nan, _grads(3))
  clean_p, clean_s = params, tx.init(params)
  dirty_p, dirty_s = params, tx.init(params)
  for g in [_grads(1), _grads(2), _grads(4), _grads(5)]:
    clean_p, clean_s = _step(tx, clean_p, clean_s, g)
  for g in [_grads(1), nan, _grads(2), _grads(4), nan, _grads(5)]:
    dirty_p, dirty_s = _step(tx, dirty_p, dirty_s, g)
  _assert_trees_close(dirty_p, clean_p)


# --- Fused AdamW ------------------------------------------------------------------


@pytest.mark.parametrize("clip,wd,warmup", [(1.0, 0.01, 2), (0.0, 0.0, 0),
                                            (0.5, 0.1, 0)])
def test_fused_adamw_equals_optax_chain(clip, wd, warmup):
  """Same parameters and moments as apply_if_finite(chain(clip, adamw)) over
  steps that clip, do not clip, and are skipped (NaN, then Inf)."""
  common = dict(learning_rate=0.05, weight_decay=wd, warmup_steps=warmup,
                grad_clip_norm=clip)
  fused = optimizers.build_optimizer(_opt_config(fused=True, **common), 10)
  chain = optimizers.build_optimizer(_opt_config(fused=False, **common), 10)
  assert isinstance(fused.init(_params()), optimizers.FusedAdamWState)
  assert not isinstance(chain.init(_params()), optimizers.FusedAdamWState)

  grads = []
  for i, scale in enumerate([0.01, 10.0, 0.3, 1.0, 2.0, 0.05, 5.0]):
    g = _grads(30 + i, scale)
    if i == 3:
      g["dense"]["bias"] = g["dense"]["bias"].at[0].set(jnp.nan)
    if i == 4:
      g["embeddings"] = g["embeddings"].at[2, 1].set(-jnp.inf)
    grads.append(g)
  results = []
  for tx in (fused, chain):
    params, state = _params(), tx.init(_params())
    step = jax.jit(lambda p, s, g, tx=tx: _step(tx, p, s, g))
    for g in grads:
      params, state = step(params, state, g)
    results.append((params, _moments(state), optimizers.bad_step_count(state),
                    optimizers.total_bad_steps(state)))
  (p_f, m_f, bad_f, total_f), (p_c, m_c, bad_c, total_c) = results
  _assert_trees_close(p_f, p_c, rtol=1e-6, atol=1e-7)
  _assert_trees_close(m_f, m_c, rtol=1e-6, atol=1e-9)
  assert (int(bad_f), int(total_f)) == (int(bad_c), int(total_c)) == (0, 2)
  assert not np.allclose(p_f["embeddings"], _params()["embeddings"])


def test_fused_adamw_skips_a_gradient_whose_norm_overflows():
  """Finite elements, but |g|^2 is Inf in float32: skipped like a NaN
  (optax's chain would clip it to a zero gradient and step)."""
  tx = optimizers.build_optimizer(_opt_config(fused=True, learning_rate=0.1,
                                              warmup_steps=0), 10)
  params = _params()
  params, state = _step(tx, params, tx.init(params), _grads(0))
  huge = _grads(1)
  huge["dense"]["bias"] = huge["dense"]["bias"].at[0].set(1e20)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(huge))
  new_params, new_state = _step(tx, params, state, huge)
  _assert_trees_equal(new_params, params)
  _assert_trees_equal(_moments(new_state), _moments(state))
  assert int(optimizers.bad_step_count(new_state)) == 1
  new_params, new_state = _step(tx, new_params, new_state, _grads(2))
  assert int(optimizers.bad_step_count(new_state)) == 0
  assert not np.allclose(new_params["embeddings"], params["embeddings"])


def test_fused_adamw_only_without_accumulation():
  """Accumulation, other optimisers and fused=False use optax's chain."""
  for overrides in (dict(grad_accum_steps=2), dict(name="lamb"),
                    dict(fused=False)):
    tx = optimizers.build_optimizer(_opt_config(**overrides), 10)
    assert not isinstance(tx.init(_params()), optimizers.FusedAdamWState)


def test_fused_adamw_update_has_no_model_sized_temporaries():
  """The point of fusing: the compiled update works in place. optax's chain
  keeps the clipped gradients and the cond's outputs in extra buffers."""
  params = {"embeddings": jnp.ones((2048, 256)), "kernel": jnp.ones((256, 256)),
            "bias": jnp.ones((256,))}
  grads = jax.tree.map(lambda p: 1e-3 * p, params)
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  temps = {}
  for fused in (True, False):
    tx = optimizers.build_optimizer(_opt_config(fused=fused), 10)

    def update(state, params, grads, tx=tx):
      updates, state = tx.update(grads, state, params)
      return state, optax.apply_updates(params, updates)

    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
        tx.init(params), params, grads).compile()
    temps[fused] = compiled.memory_analysis().temp_size_in_bytes
  assert temps[True] < 0.05 * param_bytes, temps
  assert temps[False] > 0.5 * param_bytes, temps


def test_bad_step_count_with_nnx_optimizer():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = optimizers.build_optimizer(_opt_config(warmup_steps=0), 10)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  kernel = np.asarray(model.kernel[...])
  grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan),
                       nnx.state(model, nnx.Param))
  opt.update(model, grads)
  opt.update(model, grads)
  assert int(optimizers.bad_step_count(opt.opt_state)) == 2
  np.testing.assert_array_equal(model.kernel[...], kernel)


def test_bad_step_count_requires_our_optimizer():
  state = optax.adam(1e-3).init(_params())
  with pytest.raises(ValueError, match="apply_if_finite"):
    optimizers.bad_step_count(state)


# --- Other optimisers ----------------------------------------------------------


@pytest.mark.parametrize("name,lr", [("adafactor", 0.05), ("lamb", 0.05),
                                     ("adamw", 0.05)])
def test_optimizers_reduce_quadratic(name, lr):
  tx = optimizers.build_optimizer(
      _opt_config(name=name, learning_rate=lr, schedule="constant",
                  warmup_steps=0, weight_decay=0.0), 100)
  target = _grads(7)
  params = _params()

  def loss_fn(p):
    sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, target)
    return sum(jax.tree.leaves(sq))

  @jax.jit
  def train_step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    p, s = _step(tx, p, s, g)
    return p, s, loss

  state = tx.init(params)
  first = float(loss_fn(params))
  for _ in range(60):
    params, state, _ = train_step(params, state)
  assert float(loss_fn(params)) < 0.25 * first


def test_unknown_optimizer_name():
  with pytest.raises(ValueError, match=r"config\.optimizer\.name 'sgd'.*adamw, "
                     r"adafactor, lamb"):
    optimizers.build_optimizer(_opt_config(name="sgd"), 10)


def test_bad_grad_accum_steps():
  with pytest.raises(ValueError, match=r"config\.optimizer\.grad_accum_steps"):
    optimizers.build_optimizer(_opt_config(grad_accum_steps=0), 10)


# --- Step counting -------------------------------------------------------------


def test_steps_from_config():
  config = default.get_config()
  config.total_steps = 123
  assert optimizers.steps_from_config(config, 10) == 123
  config.total_steps = -1
  config.num_epochs = 3.0
  assert optimizers.steps_from_config(config, 100) == 300
  config.optimizer.grad_accum_steps = 4
  assert optimizers.steps_from_config(config, 101) == 75  # 303 // 4
  config.optimizer.grad_accum_steps = 1
  config.num_epochs = 0.29
  assert optimizers.steps_from_config(config, 100) == 29
  config.num_epochs = 0.0
  with pytest.raises(ValueError, match=r"config\.num_epochs"):
    optimizers.steps_from_config(config, 100)
  config.num_epochs = 1.0
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optimizers.steps_from_config(config, 0)
