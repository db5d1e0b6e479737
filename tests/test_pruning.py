"""Unstructured pruning: the schedule, exact Top-k, the straight-through
scores, masks that hold their sparsity through training and resume, export."""

import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import quickstart
from research import export, parallelism, restore, train
from research.methods.pruning import layers, schedule
from research.training.checkpointing import Checkpointer


def _config(model_dir, method, steps=8, **options):
  config = quickstart.get_config()
  config.model.name = str(model_dir)
  config.wandb.mode = "disabled"
  config.parallelism.mesh_shape = (1, 1, 1)
  config.optimizer.learning_rate = 1e-3
  config.data.buckets = (64,)  # one batch shape: one compilation
  config.total_steps = steps
  config.log_every_steps = 1
  config.eval_every_steps = 4
  config.methods = (method,)
  config.method_options = {method: options}
  return config


def test_cubic_schedule_is_zhu_and_gupta():
  s = [schedule.cubic_sparsity(t, 0.9, initial=0.1, begin=10, end=20)
       for t in range(25)]
  assert s[:10] == [0.0] * 10 and s[10] == pytest.approx(0.1)
  assert s[20:] == [0.9] * 5
  # eq. 1 at t0 + 3: s_f + (s_i - s_f) (1 - 3/10)^3
  assert s[13] == pytest.approx(0.9 - 0.8 * 0.7 ** 3)
  assert all(a <= b for a, b in zip(s[10:], s[11:]))
  steps = schedule.mask_steps(25, begin=10, end=17, frequency=3)
  assert list(np.flatnonzero(steps)) == [10, 13, 16, 17]


def test_keep_top_is_exact_with_ties_and_signs():
  x = np.array([0.5, -1.0, -1.0, 0.5, 0.5, 2.0, -0.0, 0.0, -3.0, 1e-30],
               np.float32)
  rng = np.random.RandomState(0).randn(997).astype(np.float32)
  for values in (x, rng):
    for keep in (0, 1, 3, 5, len(values) // 2, len(values) - 1, len(values)):
      got = np.asarray(schedule.keep_top(jnp.asarray(values), keep))
      want = np.zeros(len(values), np.float32)
      want[np.argsort(-values, kind="stable")[:keep]] = 1
      np.testing.assert_array_equal(got, want)


def test_movement_scores_get_the_straight_through_gradient():
  """dL/dS = dL/dW' * W with W' = W * M, whatever M is."""
  layer = layers.PrunedDense(6, 4, scores=True, rngs=nnx.Rngs(0))
  mask = (np.random.RandomState(1).rand(6, 4) > 0.5).astype(np.float32)
  layer.pruning_mask[...] = jnp.asarray(mask)
  x = jax.random.normal(jax.random.key(2), (3, 6))
  graphdef, params = nnx.split(layer)

  def loss(p):
    return (nnx.merge(graphdef, p)(x) ** 2).sum()

  grads = nnx.to_flat_state(jax.grad(loss)(params))
  grads = {path: v[...] for path, v in grads}
  w = np.asarray(layer.kernel[...])
  w_masked = w * mask
  # dL/dW' for y = x W' + b, L = sum(y^2).
  y = np.asarray(x) @ w_masked + np.asarray(layer.bias[...])
  d_w_masked = np.asarray(x).T @ (2 * y)
  np.testing.assert_allclose(grads[("pruning_scores",)], d_w_masked * w,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads[("kernel",)], d_w_masked * mask,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(grads[("pruning_mask",)], 0)


def _masks(params):
  return {p[:-1]: np.asarray(v[...]) for p, v in nnx.to_flat_state(params)
          if p[-1] == "pruning_mask"}


def test_magnitude_masks_follow_the_schedule_and_hold(tiny_model_dir):
  """After every update: the masks' sparsity is the schedule's at its mask
  steps, never falls, stays at the final value after `end`; the pruned
  weights are exactly 0 in the kernels."""
  steps, begin, end = 10, 2, 6
  config = _config(tiny_model_dir, "magnitude_pruning", steps=steps,
                   sparsity=0.8, begin=begin / steps, end=end / steps,
                   frequency=2)
  run = train.build(config)
  mask_steps = np.flatnonzero(schedule.mask_steps(steps, begin=begin, end=end,
                                                  frequency=2))
  assert list(mask_steps) == [2, 4, 6]
  state, previous = run.state, None
  for step in range(steps):
    batch = parallelism.shard_batch(run.train_batches.batch_at(step),
                                    run.batch_sharding)
    state, _ = run.train_step(state, run.frozen, batch, step)
    t = step + 1
    flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state["params"])}
    masks = _masks(state["params"])
    assert len(masks) == 12  # Q, K, V, attention output, FFN x 2 layers
    last = max([u for u in mask_steps if u <= t], default=None)
    for path, mask in masks.items():
      want = 0 if last is None else round(schedule.cubic_sparsity(
          last, 0.8, begin=begin, end=end) * mask.size)
      assert int((mask == 0).sum()) == want, (t, path)
      if previous is not None:  # a pruned weight never returns
        assert np.all(mask <= previous[path])
      assert np.all(flat[path + ("kernel",)][mask == 0] == 0)
    previous = masks
  assert all((m == 0).mean() == pytest.approx(0.8, abs=1e-3)
             for m in previous.values())


def _restore_latest(workdir):
  with Checkpointer(workdir) as ckpt:
    return ckpt.restore(None)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude_pruning", "movement_pruning"])
def test_masks_resume_exactly_and_export(tmp_path, tiny_model_dir, monkeypatch,
                                         method):
  """A run preempted mid-schedule resumes to the same masks, weights and
  optimiser state, bit for bit; its export computes the pruned model."""
  config = _config(tiny_model_dir, method, steps=8, sparsity=0.6, begin=0.25,
                   end=0.75, frequency=1)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)
  real = Checkpointer.reached_preemption
  monkeypatch.setattr(Checkpointer, "reached_preemption",
                      lambda self, step: step == 3 or real(self, step))
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config, resumed)
  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  train.train_and_evaluate(config, resumed)
  (_, a, _), (_, b, _) = _restore_latest(straight), _restore_latest(resumed)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 20
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  restored = restore.restore_run(straight, "latest")
  model = restored.model
  sparsity = layers.sparsity(model)
  assert set(sparsity) - {"total"} and all(
      v == pytest.approx(0.6, abs=2e-3) for v in sparsity.values())
  ids = np.random.RandomState(0).randint(1000, 2000, (2, 9))
  mask = np.ones((2, 9), np.int64)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  out = export.export_run(straight, str(tmp_path / "hf"), "latest")
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf_model = transformers.BertForSequenceClassification.from_pretrained(out)
  hf_model.eval()
  weight = hf_model.bert.encoder.layer[0].intermediate.dense.weight
  assert (weight == 0).float().mean().item() == pytest.approx(0.6, abs=2e-3)
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids),
                      attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_movement_probe_reports_the_schedules_masks(tiny_model_dir):
  """benchmarks/movement_probe.py: one row per update whose masks changed,
  at the schedule's sparsity, with the share of the pruned weights that
  were large (|W| in the layer's top half)."""
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "benchmarks"))
  import movement_probe  # pylint: disable=import-outside-toplevel
  config = _config(tiny_model_dir, "movement_pruning", steps=8, sparsity=0.6,
                   begin=0.25, end=0.75, frequency=1)
  rows = movement_probe.probe(config, 8)
  assert [r["update"] for r in rows][0] == 3  # s_t > 0 from begin + 1
  for r in rows:
    want = schedule.cubic_sparsity(r["update"], 0.6, begin=2, end=6)
    assert r["pruned"] == pytest.approx(want, abs=2e-3)
    assert 0.0 <= r["pruned_in_top_half"] <= 1.0
    assert np.isfinite(r["loss_before"]) and np.isfinite(r["loss_after"])
