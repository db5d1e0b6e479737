"""research.methods.privacy.accounting against dp-accounting and the analytic Gaussian."""

import logging
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import optimize, stats

from research.methods.privacy import accounting


def _direct(accountant, q, sigma, steps, delta):
  """dp-accounting's own computation, written out as its docs show."""
  acc = {"rdp": rdp.RdpAccountant, "pld": pld.PLDAccountant}[accountant]()
  event = dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma))
  acc.compose(event, steps)
  return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant,q,sigma,steps,delta", [
    ("rdp", 0.01, 1.0, 1000, 1e-5),
    ("rdp", 256 / 2490, 0.8, 300, 1 / 2490),   # RTE-sized: N = 2490
    ("pld", 0.01, 1.0, 1000, 1e-5),
])
def test_epsilon_equals_dp_accounting(accountant, q, sigma, steps, delta):
  eps = accounting.epsilon(sampling_rate=q, noise_multiplier=sigma,
                           steps=steps, delta=delta, accountant=accountant)
  assert eps == pytest.approx(_direct(accountant, q, sigma, steps, delta),
                              rel=1e-12)
  assert 0.5 < eps < 50
  if accountant == "rdp":  # other step counts reuse one step's RDP: same bits
    for n in (1, 7, steps // 3, steps, 5 * steps):
      assert accounting.epsilon(sampling_rate=q, noise_multiplier=sigma,
                                steps=n, delta=delta) == _direct(
                                    "rdp", q, sigma, n, delta), n


def _analytic_gaussian_epsilon(mu, delta):
  """Exact epsilon of a Gaussian mechanism with sensitivity/std = mu.

  Balle & Wang 2018, Theorem 8: delta(eps) = Phi(mu/2 - eps/mu)
  - e^eps Phi(-mu/2 - eps/mu); solved for eps.
  """
  def gap(eps):
    return (stats.norm.cdf(mu / 2 - eps / mu)
            - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - delta)
  return optimize.brentq(gap, 0, 100, xtol=1e-12)


def test_full_batch_matches_analytic_gaussian():
  # q = 1: k Gaussian steps of noise sigma compose exactly to one Gaussian
  # mechanism with sigma / sqrt(k), whose epsilon is known in closed form.
  # PLD is tight up to its discretisation; RDP is an upper bound.
  sigma, steps, delta = 4.0, 16, 1e-5
  exact = _analytic_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
  eps_pld = accounting.epsilon(sampling_rate=1.0, noise_multiplier=sigma,
                               steps=steps, delta=delta, accountant="pld")
  eps_rdp = accounting.epsilon(sampling_rate=1.0, noise_multiplier=sigma,
                               steps=steps, delta=delta, accountant="rdp")
  assert exact - 1e-6 <= eps_pld <= exact + 1e-3
  assert eps_rdp > exact + 0.05  # RDP's conversion loses a little


def test_monotonic():
  def eps(q=0.02, sigma=1.0, steps=500, accountant="rdp"):
    return accounting.epsilon(sampling_rate=q, noise_multiplier=sigma,
                              steps=steps, delta=1e-5, accountant=accountant)
  by_steps = [eps(steps=n) for n in (0, 1, 10, 100, 500, 2000)]
  by_sigma = [eps(sigma=s) for s in (0.6, 0.8, 1.0, 2.0, 4.0)]
  by_q = [eps(q=q) for q in (0.001, 0.01, 0.05, 0.2)]
  assert by_steps[0] == 0.0
  assert np.all(np.diff(by_steps) > 0)
  assert np.all(np.diff(by_sigma) < 0)
  assert np.all(np.diff(by_q) > 0)
  assert eps(accountant="pld") < eps(accountant="rdp")


@pytest.mark.parametrize("target,q,steps", [
    (8.0, 256 / 2490, 300), (3.0, 0.01, 1000), (1.0, 0.05, 200)])
def test_calibration_round_trip_rdp(target, q, steps):
  tol = 1e-3
  sigma = accounting.calibrate_noise_multiplier(
      target_epsilon=target, sampling_rate=q, steps=steps, delta=1e-5,
      tol=tol)
  kw = dict(sampling_rate=q, steps=steps, delta=1e-5)
  assert accounting.epsilon(noise_multiplier=sigma, **kw) <= target
  # Within tol of the boundary: a little less noise overspends.
  assert accounting.epsilon(noise_multiplier=sigma - 1.01 * tol, **kw) > target


def test_calibration_round_trip_pld_needs_less_noise():
  kw = dict(sampling_rate=0.01, steps=1000, delta=1e-5)
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=3.0,
                                                accountant="pld", **kw)
  eps = lambda s: accounting.epsilon(noise_multiplier=s, accountant="pld",
                                     **kw)
  assert eps(sigma) <= 3.0 < eps(sigma - 1.01e-3)
  sigma_rdp = accounting.calibrate_noise_multiplier(target_epsilon=3.0, **kw)
  assert sigma < 0.97 * sigma_rdp


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_max_steps_is_the_budget_boundary(accountant):
  kw = dict(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-5,
            accountant=accountant)
  n = accounting.max_steps(target_epsilon=2.0, **kw)
  assert 500 < n < 5000
  assert accounting.epsilon(steps=n, **kw) <= 2.0
  assert accounting.epsilon(steps=n + 1, **kw) > 2.0


def test_max_steps_zero_when_one_step_overspends():
  assert accounting.max_steps(target_epsilon=0.1, sampling_rate=1.0,
                              noise_multiplier=1.0, delta=1e-5) == 0


def test_delta_default_and_refusal():
  # min(1e-5, 1/(N ln N)): 1e-5 up to N ~ 10,900, then 1/(N ln N).
  assert accounting.resolve_delta(None, 2490) == 1e-5
  assert accounting.resolve_delta(None, 8529) == 1e-5  # 1/(N ln N) = 1.3e-5
  assert accounting.resolve_delta(None, 100_000) == pytest.approx(
      1 / (100_000 * math.log(100_000)))  # 8.7e-7
  for n in (1, 2, 3, 50, 8529, 10**6):
    assert accounting.default_delta(n) < 1 / n or n == 1
  assert accounting.resolve_delta(0.0004, 2500) == 0.0004  # exactly 1/N
  assert accounting.resolve_delta(1e-6, 2500) == 1e-6
  with pytest.raises(ValueError, match=r"dp_sgd\.delta = 0\.001 "
                     r"must be in \(0, 1/N\].*N = 2500.*1/\(N ln N\)\) "
                     r"= 1e-05"):
    accounting.resolve_delta(1e-3, 2500)
  with pytest.raises(ValueError, match=r"config\.method_options\.dp_sgd\.delta"):
    accounting.resolve_delta(0.0, 2500)


def test_truncation_probability_and_truncated_epsilon():
  # P[Binomial(321, 0.05) > 16]: the binomial tail, against a direct sum.
  p = accounting.truncation_probability(num_examples=320, sampling_rate=0.05,
                                        max_batch_size=16)
  direct = sum(math.comb(321, k) * 0.05**k * 0.95**(321 - k)
               for k in range(17, 322))
  assert p == pytest.approx(direct, rel=1e-9)
  # A padded batch far above the mean: the cut sampler is Poisson sampling.
  kw = dict(sampling_rate=0.05, noise_multiplier=1.0, steps=20, delta=1e-5)
  loose = accounting.truncated_epsilon(num_examples=320, max_batch_size=320,
                                       **kw)
  assert loose == pytest.approx(accounting.epsilon(accountant="pld", **kw),
                                rel=1e-3)


def test_plan_calibrates_for_a_target():
  account = accounting.plan(num_examples=2490, expected_batch_size=256,
                            steps=300, target_epsilon=8.0)
  assert account.delta == 1e-5
  assert account.sampling_rate == 256 / 2490
  assert account.caveat is None
  assert account.epsilon(300) <= 8.0
  budget = account.max_steps()
  assert budget >= 300
  assert account.epsilon(budget + 1) > 8.0
  fixed = accounting.plan(num_examples=2490, expected_batch_size=256,
                          steps=300, noise_multiplier=account.noise_multiplier)
  assert fixed.max_steps() is None
  assert fixed.epsilon(300) == account.epsilon(300)


def test_plan_shuffle_is_labelled(caplog):
  with caplog.at_level(logging.WARNING):
    account = accounting.plan(num_examples=1000, expected_batch_size=10,
                              steps=100, noise_multiplier=1.0,
                              sampling="shuffle")
  assert account.caveat == accounting.SHUFFLE_CAVEAT
  assert "accounted as Poisson" in caplog.text
  assert "config.method_options.dp_sgd.sampling" in caplog.text


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_epsilon=1.0, noise_multiplier=1.0), "exactly one of"),
    (dict(), "exactly one of"),
    (dict(noise_multiplier=1.0, sampling="bucketed"),
     r"config\.method_options\.dp_sgd\.sampling = 'bucketed'; valid choices: "
     r"\['poisson', 'shuffle'\]"),
    (dict(noise_multiplier=1.0, accountant="gdp"),
     r"config\.method_options\.dp_sgd\.accountant = 'gdp'; valid choices: \['pld', 'rdp'\]"),
    (dict(noise_multiplier=1.0, expected_batch_size=5000),
     r"config\.batch_size \(the expected batch size\) = 5000 must be in "
     r"\[1, N = 1000\]"),
    (dict(noise_multiplier=0.0), r"config\.method_options\.dp_sgd\.noise_multiplier = 0\.0"),
    (dict(target_epsilon=-1.0), r"config\.method_options\.dp_sgd\.target_epsilon = -1\.0"),
    (dict(target_epsilon=1e4), "too large to be meaningful"),
])
def test_plan_refuses_bad_fields(kwargs, message):
  base = dict(num_examples=1000, expected_batch_size=10, steps=100)
  with pytest.raises(ValueError, match=message):
    accounting.plan(**{**base, **kwargs})
