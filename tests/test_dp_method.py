"""research/methods/dp_sgd.py: DP-SGD through the training core, end to end.

The step-level tests build a run (`train.build`) and drive its loss and
gradient function through `make_train_step` with plain SGD at learning rate
1, so `params - new params` is exactly the gradient the step applied.
"""

import dataclasses
import json
import pathlib
import signal
import subprocess

import dp_accounting
import jax
import numpy as np
import optax
import pytest

from research import methods as methods_lib
from research import parallelism, train
from research.configs import ConfigError, validate
from research.data import samplers
from research.methods.privacy import accounting
from research.training import steps as steps_lib
from tests import test_reliability as rel
from tests.test_dp_sgd import _noise_std_check
from tests.test_train import _metrics, _tiny_config

pytestmark = pytest.mark.usefixtures("compilation_cache")

# 16 expected examples per batch of the 320 quickstart sentences, one bucket,
# no dropout (per-example and batch dropout keys differ).
BASE = {"total_steps": 6, "log_every_steps": 2, "eval_every_steps": 6,
        "data.max_length": 32, "data.buckets": (32,),
        "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
        "dp.noise_multiplier": 1.0}
N, B = 320, 16


def _config(model_dir, **overrides):
  """A tiny run with the dp_sgd method; "dp.<option>" keys are its options
  ("dp.enabled": False leaves the method out)."""
  merged = {**BASE, **overrides}
  dp = {k[3:]: merged.pop(k) for k in list(merged) if k.startswith("dp.")}
  private = dp.pop("enabled", True)
  config = _tiny_config(model_dir, **merged)
  if private:
    config.methods = tuple(config.methods) + ("dp_sgd",)
    config.method_options = {**config.method_options.to_dict(), "dp_sgd": dp}
  return config


def _direct_epsilon(q, sigma, steps, delta):
  """dp-accounting's RDP epsilon, written out as its documentation does."""
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma)), steps)
  return acc.get_epsilon(delta)


class Stepper:
  """A run's loss and gradient function under SGD(lr=1): step -> gradient."""

  def __init__(self, run, accum=1):
    tx = optax.MultiSteps(optax.sgd(1.0), accum) if accum > 1 else \
        optax.sgd(1.0)
    tx = optax.apply_if_finite(tx, 10)
    params = run.state["params"]
    state = {"params": params, "opt_state": tx.init(params)}
    rules = run.config.parallelism.logical_axis_rules
    strategy = run.config.parallelism.strategy
    self.sharding = parallelism.state_shardings(state, run.mesh, rules,
                                                strategy)
    # Kept on the host: each `grads` call puts a fresh copy on the devices
    # (the step donates it) without compiling a copy program per leaf shape,
    # as `jnp.copy` would (~50 programs, 8 s of a test).
    self.state = jax.device_get(state)
    self.run = run
    self.step = steps_lib.make_train_step(
        tx, methods_lib.wrap_loss(run.methods, run.task.loss_fn(run.graphdef)),
        grad_fn=methods_lib.grad_fn(run.methods, steps_lib.value_and_grad),
        seed=run.config.seed, mesh=run.mesh, strategy=strategy,
        state_sharding=self.sharding, frozen_sharding=run.frozen_sharding)

  def grads(self, batches, micro_step=0):
    """The flat gradient applied after the micro-batches `batches`."""
    before = np.concatenate([np.ravel(x) for x in
                             jax.tree.leaves(self.state["params"])])
    state = jax.device_put(self.state, self.sharding)
    for i, batch in enumerate(batches):
      state, _ = self.step(state, self.run.frozen, parallelism.shard_batch(
          batch, self.run.batch_sharding), micro_step + i)
    after = np.concatenate([np.ravel(x) for x in
                            jax.tree.leaves(state["params"])])
    return before - after


def _batch(run, real=B):
  """A training batch of the run with exactly `real` weighted rows.

  The first batch with at least `real` drawn examples (a Poisson batch
  holds them first); the rest of its rows get weight 0.
  """
  batch = next(b for s in range(100)
               if (b := dict(run.train_batches.batch_at(s)))["weights"].sum()
               >= real)
  batch["weights"] = (np.arange(len(batch["weights"])) < real).astype(
      np.float32)
  return batch


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
  """The non-private run on the same (Poisson) batches."""
  return train.build(_config(tiny_model_dir, **{
      "dp.enabled": False, "dp.noise_multiplier": -1.0,
      "data.sampler": "poisson"}))


def test_huge_clip_no_noise_is_the_non_private_update(tiny_model_dir, plain):
  # C = 1e6 (clips nothing), as the flat run of the automatic-clipping test
  # below: the same program, compiled once in the session's cache.
  private = train.build(_config(tiny_model_dir, **{
      "dp.noise_multiplier": 0.0, "dp.clip_norm": 1e6}))
  batch = _batch(plain)
  assert len(batch["weights"]) == 32  # 16 + 4 sqrt(16) rows, weights 0 after B
  want = Stepper(plain).grads([batch])
  got = Stepper(private).grads([batch])
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


@pytest.fixture(scope="module")
def noisy(tiny_model_dir):
  """sigma 1.3, C 0.05 (most examples clipped) and its sigma-0 twin."""
  kw = {"dp.clip_norm": 0.05}
  return (train.build(_config(tiny_model_dir, **{
      **kw, "dp.noise_multiplier": 1.3})),
          train.build(_config(tiny_model_dir, **{
              **kw, "dp.noise_multiplier": 0.0})))


def test_noise_std_is_sigma_c_over_expected_batch(noisy):
  run, clean = noisy
  batch = _batch(run, real=11)  # the divisor is B, not the 11 drawn
  stepper, clean_stepper = Stepper(run), Stepper(clean)
  base = clean_stepper.grads([batch])
  draws = [stepper.grads([batch], micro_step=s) for s in range(4)]
  noise = np.stack(draws) - base  # 4 steps x ~1M weights
  _noise_std_check(noise, 1.3 * 0.05 / B)
  corr = np.corrcoef(noise)
  assert np.abs(corr[~np.eye(4, dtype=bool)]).max() < 0.01  # new per step
  # The noise is a function of (seed, step): resume redraws it exactly.
  np.testing.assert_array_equal(stepper.grads([batch], micro_step=2),
                                draws[2])
  # Each example's clipped gradient has norm <= C (= C: all are clipped).
  for i in range(4):
    alone = dict(batch, weights=(np.arange(32) == i).astype(np.float32))
    assert np.linalg.norm(clean_stepper.grads([alone]) * B) == pytest.approx(
        0.05, rel=1e-3)


@pytest.mark.parametrize("strategy", ["pmap", "jit"])
def test_eight_devices_add_the_noise_once(tiny_model_dir, noisy, strategy):
  run, _ = noisy
  batch = _batch(run, real=13)
  one = Stepper(run).grads([batch], micro_step=3)
  eight = train.build(_config(tiny_model_dir, **{
      "dp.clip_norm": 0.05, "dp.noise_multiplier": 1.3,
      "parallelism.mesh_shape": (8, 1, 1),
      "parallelism.strategy": strategy}))
  assert eight.mesh.devices.size == 8
  # The same noise (key from the step, not the device) added once: per
  # device it would be sqrt(8) times larger, or differ.
  np.testing.assert_allclose(Stepper(eight).grads([batch], micro_step=3), one,
                             rtol=1e-4, atol=1e-6)


def test_accumulation_adds_the_noise_once_per_logical_batch(noisy,
                                                            tiny_model_dir):
  run, _ = noisy
  batch = _batch(run, real=14)
  whole = Stepper(run).grads([batch])
  accum = train.build(_config(tiny_model_dir, **{
      "dp.clip_norm": 0.05, "dp.noise_multiplier": 1.3,
      "optimizer.grad_accum_steps": 2}))
  halves = [{k: v[s] for k, v in batch.items()}
            for s in (slice(0, 16), slice(16, 32))]
  np.testing.assert_allclose(Stepper(accum, accum=2).grads(halves), whole,
                             rtol=1e-4, atol=1e-6)
  # One Poisson draw per logical batch, split over its micro-batches.
  batcher = accum.train_batches
  assert batcher.sampler.micro_batches == 2 and batcher.batch_size == 16
  order = batcher.sampler.epoch(0)
  draws = order.reshape(-1, 32)
  assert len(order) == 2 * (N // 16)
  sizes = []
  for draw in draws:
    real = draw[draw >= 0]
    assert len(set(real.tolist())) == len(real)  # no example twice
    sizes.append(len(real))
  assert 12 < np.mean(sizes) < 20 and len(set(sizes)) > 3


def test_epsilon_logged_and_in_summary_equal_dp_accounting(tmp_path,
                                                           tiny_model_dir):
  config = _config(tiny_model_dir, **{"dp.noise_multiplier": -1.0,
                                      "dp.target_epsilon": 2.0})
  summary = train.train_and_evaluate(config, str(tmp_path))
  sigma = summary["privacy/noise_multiplier"]
  # The default delta, min(1e-5, 1/(N ln N)): here 1e-5, well below 1/N.
  delta = summary["privacy/delta"]
  assert delta == 1e-5 < 1 / N
  assert summary["privacy/sampling_rate"] == B / N
  eps = _direct_epsilon(B / N, sigma, 6, delta)
  assert summary["privacy/epsilon"] == pytest.approx(eps, rel=1e-12)
  assert 1.9 < eps <= 2.0  # calibrated for the 6 planned steps
  logged = {r["step"]: r["privacy/epsilon"] for r in _metrics(tmp_path)
            if "privacy/epsilon" in r}
  assert list(logged) == [2, 4, 6]
  for step, value in logged.items():
    assert value == pytest.approx(_direct_epsilon(B / N, sigma, step, delta),
                                  rel=1e-12)
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["privacy/epsilon"] == summary["privacy/epsilon"]
  # A resumed run must keep the privacy settings of privacy.json.
  config.method_options.dp_sgd.clip_norm = 2.0
  with pytest.raises(ConfigError, match="privacy.json: this workdir's run "
                     "has privacy settings"):
    train.build(config, str(tmp_path))


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, tiny_model_dir):
  """(config, workdir, summary): sigma 0.8 and C = 0.05 with a budget of
  epsilon 1.6 (RDP, delta 1/N) on 12 planned steps, the Poisson draws cut
  to a padded batch of exactly the expected 16 (about half are cut). Two
  tests read it."""
  config = _config(tiny_model_dir, **{
      "dp.noise_multiplier": 0.8, "dp.target_epsilon": 1.6,
      "dp.delta": 1 / N, "dp.clip_norm": 0.05, "total_steps": 12,
      "data.sampler_options": {"max_batch_size": B}})
  workdir = tmp_path_factory.mktemp("budget")
  return config, workdir, train.train_and_evaluate(config, str(workdir))


def test_run_stops_before_exceeding_its_budget(budget_run):
  # sigma 0.8 at q = 0.05 affords 7 steps of epsilon 1.6 (RDP, delta 1/N).
  _, _, summary = budget_run
  assert _direct_epsilon(B / N, 0.8, 7, 1 / N) <= 1.6 < _direct_epsilon(
      B / N, 0.8, 8, 1 / N)
  assert summary["final_step"] == summary["privacy/steps"] == 7
  assert summary["privacy/epsilon"] <= 1.6
  assert "step 8 would spend epsilon 1.603" in summary["stopped"]
  assert "config.method_options.dp_sgd.target_epsilon=1.6" in summary["stopped"]


def test_truncated_draws_and_clipping_are_reported(budget_run):
  """Poisson draws cut to the padded batch are counted in metrics.jsonl and
  summary.json, with the epsilon of the cut sampler; the step logs its
  clipping statistics."""
  config, workdir, summary = budget_run
  steps = summary["privacy/steps"]  # 7: the budget stops the run
  sampler = samplers.create("poisson", np.full(N, 8), B, config.seed,
                            {"max_batch_size": B})
  expected = sum(sampler.truncated_draws(s) > sampler.truncated_draws(s - 1)
                 for s in range(1, steps + 1))
  assert summary["privacy/truncated_batches"] == expected
  assert 1 <= expected <= 6  # P[Binomial(320, 0.05) > 16] = 0.44 per draw
  assert summary["privacy/max_batch_size"] == B
  assert 0.3 < summary["privacy/truncation_probability"] < 0.6
  # The cut sampler's epsilon: dp-accounting's truncated event (PLD). Cutting
  # 44% of the draws costs privacy in its analysis: above the uncut one.
  cut_eps = summary["privacy/epsilon_truncated_sampler"]
  assert cut_eps == pytest.approx(accounting.truncated_epsilon(
      num_examples=N, sampling_rate=B / N, max_batch_size=B,
      noise_multiplier=0.8, steps=steps, delta=summary["privacy/delta"]))
  assert cut_eps > accounting.epsilon(
      sampling_rate=B / N, noise_multiplier=0.8, steps=steps,
      delta=summary["privacy/delta"], accountant="pld")
  logged = {r["step"]: r for r in _metrics(workdir) if "privacy/epsilon" in r}
  assert [logged[s]["privacy/truncated_batches"] for s in (2, 4, 6)] == [
      sampler.truncated_draws(s) for s in (2, 4, 6)]
  # Per-example norms against C (monitoring): at C = 0.05 a fresh head's
  # gradients are clipped.
  last = logged[6]
  assert 0.0 < last["dp/clip_fraction"] <= 1.0
  assert last["dp/example_grad_norm_max"] >= last[
      "dp/example_grad_norm_mean"] > 0.05 * last["dp/clip_fraction"]


def test_automatic_clipping_normalises_each_example(tiny_model_dir):
  """clipping="automatic" sums C g_i / (|g_i| + gamma) (Bu et al. 2022)."""
  flat = train.build(_config(tiny_model_dir, **{
      "dp.noise_multiplier": 0.0, "dp.clip_norm": 1e6}))
  auto = train.build(_config(tiny_model_dir, **{
      "dp.noise_multiplier": 0.0, "dp.clip_norm": 0.5,
      "dp.clipping": "automatic", "dp.stability": 0.01}))
  batch = _batch(flat, real=2)
  # Each example's unclipped gradient, from the flat run with C = 1e6.
  per, flat = [], Stepper(flat)
  for i in range(2):
    one = dict(batch, weights=(np.arange(len(batch["weights"])) == i
                               ).astype(np.float32))
    per.append(flat.grads([one]) * B)  # the divisor is B
  want = sum(0.5 * g / (np.linalg.norm(g) + 0.01) for g in per) / B
  np.testing.assert_allclose(Stepper(auto).grads([batch]), want, rtol=1e-4,
                             atol=1e-7)


# --- Refused configurations --------------------------------------------------


class Method(methods_lib.Method):
  """A method replacing the gradient function (config.methods below)."""

  def grad_fn(self, grad_fn):
    return lambda loss_fn: grad_fn(loss_fn)


@pytest.mark.parametrize("overrides,message", [
    ({"methods": ("dp_sgd", "bitfit")},
     r"config.methods=\('dp_sgd', 'bitfit'\): 'dp_sgd' must come last"),
    ({"data.sampler": "bucketed"},
     r"config.data.sampler='bucketed' with config.method_options.dp_sgd."
     r"sampling='poisson': length-bucketed"),
    ({"data.examples_per_row": 4, "dp.sampling": "shuffle"},
     r"config.data.examples_per_row=4 with DP-SGD: packed rows"),
    ({"dp.noise_multiplier": -1.0},
     r"config.method_options.dp_sgd: set target_epsilon > 0"),
    ({"dp.noise_multiplier": 0.0, "dp.target_epsilon": 1.0},
     r"no noise spends an infinite epsilon"),
    ({"dp.clip_norm": 0.0},
     r"config.method_options.dp_sgd.clip_norm=0.0 must be > 0"),
    ({"dp.sampling": "random"},
     r"config.method_options.dp_sgd.sampling='random'; valid: poisson, "
     r"shuffle"),
    ({"dp.accountant": "gdp"}, r"valid: rdp, pld"),
    ({"dp.clipping": "auto"}, r"dp_sgd.clipping='auto'; valid: flat, "
     r"automatic"),
    ({"data.sampler_options": {"micro_batches": 3},
      "optimizer.grad_accum_steps": 2},
     r"micro_batches=3 must equal config.optimizer.grad_accum_steps=2"),
])
def test_refused_before_anything_loads(tiny_model_dir, overrides, message):
  methods = overrides.pop("methods", None)
  config = _config(tiny_model_dir, **overrides)
  if methods:
    config.methods = methods
  with pytest.raises(ConfigError, match=message):
    validate(config)


def test_options_of_an_unlisted_method_are_refused(tiny_model_dir):
  config = _config(tiny_model_dir, **{"dp.enabled": False})
  config.method_options = {"dp_sgd": {"noise_multiplier": 1.0}}
  with pytest.raises(ConfigError, match=r"config.method_options.dp_sgd is "
                     r"set but config.methods=\(\) does not list 'dp_sgd'"):
    validate(config)


def test_refused_at_build(tiny_model_dir):
  with pytest.raises(ConfigError, match=r"config.method_options.dp_sgd.delta "
                     r"= 0.01 must "
                     r"be in \(0, 1/N\] = \(0, 0.00313\] for N = 320"):
    train.build(_config(tiny_model_dir, **{"dp.delta": 0.01}))
  config = _config(tiny_model_dir)
  config.methods = ("tests.test_dp_method", "dp_sgd")
  with pytest.raises(ConfigError, match="replaces the gradient function"):
    train.build(config)
  # Several features of one example (question answering's windows).
  run = train.build(_config(tiny_model_dir))
  method = run.methods[-1]  # the run's own instance
  split = run.train_split
  split.rows[1] = split.rows[0]
  with pytest.raises(ConfigError, match="320 features from 319 examples"):
    method.setup(dataclasses.replace(run.context, train_split=split,
                                     workdir=None))


def test_shuffle_is_accounted_with_its_caveat(tiny_model_dir):
  run = train.build(_config(tiny_model_dir, **{"dp.sampling": "shuffle"}))
  assert isinstance(run.train_batches.sampler,
                    samplers.module("shuffle").Sampler)
  summary = methods_lib.metrics(run.methods, 6, summary=True)
  assert summary["privacy/caveat"].startswith("shuffled batches accounted as "
                                              "Poisson")


# --- Exact resume after SIGKILL ------------------------------------------------

RESUME = {"methods": ("dp_sgd",),
          "method_options": {"dp_sgd": {"target_epsilon": 8.0}},
          "total_steps": 12, "log_every_steps": 2, "eval_every_steps": 4,
          "checkpoint_every_steps": 4}


@pytest.mark.slow
def test_sigkill_then_resume_is_exact_and_epsilon_continues(
    tmp_path, tiny_model_dir, compilation_cache):
  cache = compilation_cache  # the session's (conftest.py)
  straight = tmp_path / "straight"
  args = rel._cli(tiny_model_dir, straight, **RESUME)  # pylint: disable=protected-access
  out = subprocess.run(args, cwd=rel.REPO, env=rel._env(cache),  # pylint: disable=protected-access
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]

  workdir, log_path = tmp_path / "run", tmp_path / "killed.log"
  args = rel._cli(tiny_model_dir, workdir, **RESUME)  # pylint: disable=protected-access
  proc = rel._kill_after_checkpoint(args, cache, workdir, log_path, 4)  # pylint: disable=protected-access
  assert proc.returncode == -signal.SIGKILL
  resume_from = rel._steps_on_disk(workdir)[-1]  # pylint: disable=protected-access
  assert 4 <= resume_from < 12
  out = subprocess.run(args, cwd=rel.REPO, env=rel._env(cache),  # pylint: disable=protected-access
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step {resume_from}" in out.stderr
  step_a, state_a, extras_a = rel._restore(straight)  # pylint: disable=protected-access
  step_b, state_b, extras_b = rel._restore(workdir)  # pylint: disable=protected-access
  assert step_a == step_b == 12 and extras_a == extras_b
  rel._assert_trees_equal(state_a, state_b)  # pylint: disable=protected-access
  # The spent epsilon continues from the step (equal logs), it does not
  # restart at 0 after the resume.
  logged = [_metrics(d) for d in (straight, workdir)]
  assert logged[0] == logged[1]
  eps = [r["privacy/epsilon"] for r in logged[1] if "privacy/epsilon" in r]
  assert len(eps) == 12 // 2
  assert np.all(np.diff(eps) > 0)
  summaries = [json.loads(pathlib.Path(d, "summary.json").read_text())
               for d in (straight, workdir)]
  assert summaries[0]["privacy/epsilon"] == summaries[1]["privacy/epsilon"]
  assert summaries[1]["privacy/epsilon"] == pytest.approx(_direct_epsilon(
      B / N, summaries[1]["privacy/noise_multiplier"], 12,
      accounting.default_delta(N)), rel=1e-12)
  assert summaries[1]["privacy/delta"] == accounting.default_delta(N)
