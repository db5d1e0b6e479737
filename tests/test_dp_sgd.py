"""research.methods.privacy.clipping: clipping, noise, chunking, 8 simulated devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.models import hf
from research.methods.privacy import clipping

DIM, CLASSES, BATCH, REAL = 24, 3, 16, 13  # rows REAL.. are padding


def _loss(params, example, key):
  """Softmax regression on one example (example arrays have a leading 1)."""
  del key
  logits = example["x"] @ params["w"] + params["b"]  # [1, CLASSES]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, example["y"])[0]


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(DIM, CLASSES)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=CLASSES), jnp.float32)}
  # Norms of per-example gradients spread over ~2 orders of magnitude.
  scale = np.exp(rng.uniform(-2, 2, size=(BATCH, 1)))
  x = rng.normal(size=(BATCH, DIM)) * scale
  x[REAL:] = np.nan  # padding rows may hold anything: they must not count
  batch = {"x": jnp.asarray(x, jnp.float32),
           "y": jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32),
           "weights": jnp.asarray(np.arange(BATCH) < REAL, jnp.float32)}
  return params, batch


def _raw_grads(params, batch):
  """Per-example gradients [B, ...] with plain jax (the reference)."""
  one = lambda x, y: jax.grad(_loss)(params, {"x": x[None], "y": y[None]},
                                     None)
  return jax.vmap(one)(batch["x"], batch["y"])


def _norm(tree):
  return float(optax.tree.norm(tree))


def test_each_clipped_gradient_has_norm_at_most_c(problem):
  params, batch = problem
  raw = _raw_grads(params, batch)
  raw_norms = np.sqrt(sum(np.sum(np.asarray(g).reshape(BATCH, -1) ** 2, 1)
                          for g in jax.tree.leaves(raw)))
  clip = float(np.median(raw_norms[:REAL]))  # about half get clipped
  fn = jax.jit(clipping.clip_and_sum(_loss, clip_norm=clip))
  key = jax.random.key(0)
  total, stats = fn(params, batch, key)
  np.testing.assert_allclose(stats["grad_norms"][:REAL], raw_norms[:REAL],
                             rtol=1e-5)
  np.testing.assert_array_equal(stats["grad_norms"][REAL:], 0.0)
  assert stats["clipped"] == np.sum(raw_norms[:REAL] > clip) == REAL // 2
  summed = jax.tree.map(jnp.zeros_like, params)
  for i in range(REAL):
    # The batch with only example i weighted: its clipped gradient alone.
    only_i = dict(batch, weights=jnp.zeros(BATCH).at[i].set(1.0))
    grad_i, _ = fn(params, only_i, key)
    assert _norm(grad_i) <= clip * (1 + 1e-5)
    factor = min(1.0, clip / raw_norms[i])
    jax.tree.map(lambda g, r: np.testing.assert_allclose(
        g, r[i] * factor, rtol=1e-5, atol=1e-6), grad_i, raw)
    summed = jax.tree.map(jnp.add, summed, grad_i)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               total, summed)


def test_large_clip_no_noise_is_the_mean_gradient(problem):
  params, batch = problem
  fn = clipping.dp_value_and_grad(_loss, clip_norm=1e9, noise_multiplier=0.0,
                                expected_batch_size=REAL)
  loss, grads, aux = jax.jit(fn)(params, batch, jax.random.key(3))
  real = {k: v[:REAL] for k, v in batch.items()}

  def mean_loss(p):  # the non-private objective on the real rows
    logits = real["x"] @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, real["y"]).mean()

  ref_loss, ref_grads = jax.value_and_grad(mean_loss)(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               grads, ref_grads)
  assert aux["num_examples"] == REAL and aux["clip_fraction"] == 0.0


@pytest.mark.parametrize("chunk_size", [1, 4, 8])
def test_chunked_equals_unchunked(problem, chunk_size):
  params, batch = problem
  kw = dict(clip_norm=1.0, noise_multiplier=0.7, expected_batch_size=10.0)
  key = jax.random.key(5)
  whole = jax.jit(clipping.dp_value_and_grad(_loss, **kw))(params, batch, key)
  chunked = jax.jit(clipping.dp_value_and_grad(_loss, chunk_size=chunk_size,
                                             **kw))(params, batch, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               whole, chunked)


def _noise_std_check(samples, expected):
  """Sample std within 5 standard errors (SE of a std: s / sqrt(2n))."""
  samples = np.asarray(samples, np.float64).ravel()
  n = samples.size
  assert abs(samples.mean()) < 5 * expected / math.sqrt(n)
  assert abs(samples.std() - expected) < 5 * expected / math.sqrt(2 * n)


def test_noise_std_is_sigma_c_over_b(problem):
  params, batch = problem
  sigma, clip, b = 1.3, 0.5, 10.0
  kw = dict(clip_norm=clip, expected_batch_size=b)
  clean = jax.jit(clipping.dp_value_and_grad(_loss, noise_multiplier=0.0,
                                           **kw))
  noisy = jax.jit(clipping.dp_value_and_grad(_loss, noise_multiplier=sigma,
                                           **kw))
  keys = jax.random.split(jax.random.key(7), 200)
  _, base, _ = clean(params, batch, keys[0])
  outs = [noisy(params, batch, k)[1] for k in keys]
  draws = [jax.tree.map(jnp.subtract, o, base) for o in outs]
  noise = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(d)])
                    for d in draws])  # [draws, params] = [200, 75]
  _noise_std_check(noise, sigma * clip / b)
  # Independent across keys and coordinates: the correlation matrix of the
  # coordinates is the identity up to sampling error.
  corr = np.corrcoef(noise.T)
  off = corr[~np.eye(len(corr), dtype=bool)]
  assert np.abs(off).max() < 5 / math.sqrt(len(keys))
  # Same key, same noise (resume); another key, other noise.
  np.testing.assert_array_equal(noisy(params, batch, keys[1])[1]["w"],
                                outs[1]["w"])
  assert not np.allclose(outs[0]["w"], outs[1]["w"], atol=sigma * clip / b)


def test_add_noise_on_many_draws():
  # 40 000 draws of one large leaf: a tight check of the std itself.
  zeros = {"a": jnp.zeros((200, 200)), "b": jnp.zeros(7, jnp.bfloat16)}
  out = clipping.add_noise(zeros, jax.random.key(1), clip_norm=2.0,
                         noise_multiplier=0.8, expected_batch_size=4.0)
  assert out["b"].dtype == jnp.bfloat16
  _noise_std_check(out["a"], 0.8 * 2.0 / 4.0)


def test_refuses_what_breaks_the_guarantee(problem):
  params, batch = problem
  fn = clipping.clip_and_sum(_loss, clip_norm=1.0, chunk_size=5)
  with pytest.raises(ValueError, match=r"config\.method_options\.dp_sgd\.chunk_size = 5 "
                     r"must divide the per-device batch of 16 rows"):
    fn(params, batch, jax.random.key(0))
  packed = dict(batch, segment_ids=jnp.zeros((BATCH, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"packed rows.*"
                     r"config\.data\.examples_per_row = 1"):
    clipping.clip_and_sum(_loss, clip_norm=1.0)(params, packed,
                                              jax.random.key(0))
  no_weights = {k: v for k, v in batch.items() if k != "weights"}
  with pytest.raises(ValueError, match=r"batch\['weights'\]"):
    clipping.clip_and_sum(_loss, clip_norm=1.0)(params, no_weights,
                                              jax.random.key(0))
  with pytest.raises(ValueError, match=r"config\.method_options\.dp_sgd\.clip_norm = 0"):
    clipping.clip_and_sum(_loss, clip_norm=0)
  with pytest.raises(ValueError, match=r"dp_sgd\.clipping = 'auto'; valid: "
                     r"flat, automatic"):
    clipping.clip_and_sum(_loss, clip_norm=1.0, clipping="auto")
  with pytest.raises(ValueError, match=r"config\.method_options\.dp_sgd\.noise_multiplier"):
    clipping.dp_value_and_grad(_loss, clip_norm=1.0, noise_multiplier=-1.0,
                             expected_batch_size=4)
  with pytest.raises(ValueError,
                     match=r"config\.batch_size \(the expected batch size\)"):
    clipping.dp_value_and_grad(_loss, clip_norm=1.0, noise_multiplier=1.0,
                             expected_batch_size=0)


def test_gradient_accumulation_adds_noise_once(problem):
  # Two micro-batches: clipped sums added, then one noise draw, equal the
  # logical batch of both in one call.
  params, batch = problem
  kw = dict(clip_norm=0.4, noise_multiplier=0.9, expected_batch_size=12.0)
  key = jax.random.key(9)
  _, whole, _ = jax.jit(clipping.dp_value_and_grad(_loss, **kw))(params, batch,
                                                               key)
  clip = clipping.clip_and_sum(_loss, clip_norm=kw["clip_norm"])
  halves = [clip(params, {k: v[s] for k, v in batch.items()}, key)[0]
            for s in (slice(0, 8), slice(8, BATCH))]
  noise_key, _ = jax.random.split(key)  # dp_value_and_grad's noise key
  accumulated = clipping.add_noise(jax.tree.map(jnp.add, *halves), noise_key,
                                 **kw)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               whole, accumulated)


def _sharded(fn, mesh, check_vma):
  """`fn` under shard_map over the data axis, as the pmap strategy runs it."""
  p = jax.P
  return jax.jit(jax.shard_map(
      fn, mesh=mesh, in_specs=(p(), p("data"), p()),
      out_specs=(p(), p(), {"grad_norms": p("data"), "clip_fraction": p(),
                            "num_examples": p(), "metrics": p()}),
      check_vma=check_vma))


# check_vma=True: JAX's transpose would psum a replicated input's gradient
# inside the per-example vmap (clipping sums of 8 examples); dp_value_and_grad
# must prevent that.
@pytest.mark.parametrize("check_vma", [False, True])
def test_data_parallel_adds_noise_once(check_vma):
  devices = jax.devices()
  assert len(devices) == 8, "conftest.py sets 8 simulated CPU devices"
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(DIM, CLASSES)), jnp.float32),
            "b": jnp.zeros(CLASSES)}
  rows = 32  # 4 per device; the last 5 are padding
  batch = {"x": jnp.asarray(rng.normal(size=(rows, DIM)) * 3, jnp.float32),
           "y": jnp.asarray(rng.integers(0, CLASSES, rows), jnp.int32),
           "weights": jnp.asarray(np.arange(rows) < 27, jnp.float32)}
  sigma, clip, b = 1.1, 0.3, 24.0
  kw = dict(clip_norm=clip, expected_batch_size=b, chunk_size=2)
  single = jax.jit(clipping.dp_value_and_grad(_loss, noise_multiplier=sigma,
                                            **kw))
  multi = _sharded(clipping.dp_value_and_grad(
      _loss, noise_multiplier=sigma, axis_name="data", **kw), mesh, check_vma)
  clean = _sharded(clipping.dp_value_and_grad(
      _loss, noise_multiplier=0.0, axis_name="data", **kw), mesh, check_vma)
  key = jax.random.key(11)
  one, eight = single(params, batch, key), multi(params, batch, key)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5,
                                                       atol=1e-6), one, eight)
  assert 0 < float(eight[2]["clip_fraction"]) < 1
  assert float(eight[2]["num_examples"]) == 27
  # The clipping statistics are global: one program's over 8 devices.
  stats = eight[2]["metrics"]
  assert float(stats["dp/clip_fraction"]) == float(eight[2]["clip_fraction"])
  norms = np.asarray(one[2]["grad_norms"])[:27]
  np.testing.assert_allclose(stats["dp/example_grad_norm_mean"], norms.mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(stats["dp/example_grad_norm_max"], norms.max(),
                             rtol=1e-5)
  _, base, _ = clean(params, batch, key)
  noise = np.stack([
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(
          jax.tree.map(jnp.subtract, multi(params, batch, k)[1], base))])
      for k in jax.random.split(key, 60)])  # [60, 75]
  _noise_std_check(noise, sigma * clip / b)  # not sqrt(8) times it


@pytest.mark.slow
def test_tiny_bert(tiny_bert_dir):
  model, _ = hf.load_pretrained(
      str(tiny_bert_dir), "sequence_classification", 2, seed=0,
      config_overrides={"hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0})
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(2)
  rows, length = 8, 12
  mask = (np.arange(length)[None] < rng.integers(4, length, (rows, 1)))
  batch = {"input_ids": jnp.asarray(rng.integers(1, 99, (rows, length)) * mask,
                                    jnp.int32),
           "attention_mask": jnp.asarray(mask, jnp.int32),
           "token_type_ids": jnp.zeros((rows, length), jnp.int32),
           "labels": jnp.asarray(rng.integers(0, 2, rows), jnp.int32),
           "weights": jnp.asarray([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)}

  def per_example_loss(p, example, key):
    logits = nnx.merge(graphdef, p)(
        example["input_ids"], example["attention_mask"],
        example["token_type_ids"], rngs=nnx.Rngs(dropout=key))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, example["labels"])[0]

  # The reference, eagerly (no second compile): per-example gradients of the
  # six real rows by plain jax, clipped by hand; C = their median norm.
  real = {k: v[:6] for k, v in batch.items()}
  raw = jax.vmap(lambda ex: jax.grad(per_example_loss)(
      params, jax.tree.map(lambda x: x[None], ex), jax.random.key(0)))(real)
  norms = np.sqrt(sum(np.sum(np.asarray(g).reshape(6, -1) ** 2, 1)
                      for g in jax.tree.leaves(raw)))
  clip = float(np.median(norms))
  scale = np.minimum(1.0, clip / norms)
  ref = jax.tree.map(lambda g: np.tensordot(scale, g, 1) / 6, raw)
  loss, grads, aux = jax.jit(clipping.dp_value_and_grad(
      per_example_loss, clip_norm=clip, noise_multiplier=0.0,
      expected_batch_size=6, chunk_size=2))(params, batch, jax.random.key(0))
  np.testing.assert_allclose(aux["grad_norms"][:6], norms, rtol=1e-4)
  assert aux["clip_fraction"] == 0.5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               grads, ref)
  logits = nnx.merge(graphdef, params)(
      real["input_ids"], real["attention_mask"], real["token_type_ids"])
  np.testing.assert_allclose(
      loss, optax.softmax_cross_entropy_with_integer_labels(
          logits, real["labels"]).mean(), rtol=1e-5)
