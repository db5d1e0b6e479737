"""Privacy accounting for DP-SGD: epsilon spent, noise calibration, step budget.

A thin layer over Google's `dp-accounting` package (the accountants behind
TensorFlow Privacy and jax-privacy). One DP-SGD step is a Poisson-subsampled
Gaussian mechanism: each training example joins the logical batch
independently with probability `q = expected_batch_size / N`, and the summed,
clipped gradients get Gaussian noise of std `noise_multiplier * clip_norm`.
`steps` such steps are the `dp_accounting` event

    SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)

whose epsilon at `delta` either accountant computes under add-or-remove-one
neighbouring datasets:

- `rdp`: Renyi DP (Mironov 2017; Abadi et al. 2016's moments accountant). Fast
  (~0.1 s for a new sigma, ~1 ms for another step count), a slightly loose
  upper bound.
- `pld`: privacy loss distributions (Koskela et al.; Doroshenko et al. 2022).
  Tighter (the same epsilon at ~10-20% less noise), ~1-4 s per evaluation.

The guarantee holds for Poisson sampling only. A run that shuffles and cuts
fixed-size batches is accounted as if it were Poisson (`sampling='shuffle'`):
common practice, but not a proven bound (Chua et al. 2024 show shuffling can
be much weaker); every result of such a run carries `SHUFFLE_CAVEAT`.

The config fields named in errors are those of `config.method_options.dp_sgd`:
`target_epsilon`, `noise_multiplier`, `delta`, `expected_batch_size`,
`sampling`, `accountant`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

ACCOUNTANTS = {"rdp": rdp.RdpAccountant, "pld": pld.PLDAccountant}
SAMPLINGS = ("poisson", "shuffle")
SHUFFLE_CAVEAT = ("shuffled batches accounted as Poisson sampling: "
                  "epsilon is not a proven bound")


def make_accountant(name: str) -> dp_accounting.PrivacyAccountant:
  """A fresh `dp_accounting` accountant: 'rdp' or 'pld'."""
  if name not in ACCOUNTANTS:
    raise ValueError(f"config.method_options.dp_sgd.accountant = {name!r}; valid choices: "
                     f"{sorted(ACCOUNTANTS)}")
  return ACCOUNTANTS[name]()


def dpsgd_event(sampling_rate: float, noise_multiplier: float,
                steps: int) -> dp_accounting.DpEvent:
  """`steps` Poisson-subsampled Gaussian mechanisms (one DP-SGD run)."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
      steps)


# The default delta's cap: Abadi et al. (2016) report MNIST and CIFAR-10
# (N = 60,000 and 50,000) at delta = 1e-5, below their 1/N.
DEFAULT_DELTA_CAP = 1e-5


def default_delta(num_examples: int) -> float:
  """min(1e-5, 1/(N ln N)): well below 1/N, as common practice asks.

  delta bounds the probability that the epsilon guarantee fails outright.
  At delta = 1/N a mechanism that publishes one random training example
  verbatim is (0, 1/N)-DP, so delta must be well below 1/N: "values of
  delta on the order of 1/N are very dangerous" (Dwork and Roth 2014, The
  Algorithmic Foundations of Differential Privacy, section 2.3, which asks
  for delta smaller than any inverse polynomial in N); Ponomareva et al.
  2023 ("How to DP-fy ML", JAIR) recommend delta much smaller than 1/N.
  1/(N ln N) is below 1/N by a factor ln N (9.1 for N = 8,529); 1e-5 caps
  it for small sets (N up to ~1e4), as in Abadi et al. (2016).
  """
  if num_examples < 3:  # ln N < 1: 1/(N ln N) would exceed 1/N
    return min(DEFAULT_DELTA_CAP, 1.0 / max(num_examples, 1))
  return min(DEFAULT_DELTA_CAP, 1.0 / (num_examples * math.log(num_examples)))


def resolve_delta(delta: float | None, num_examples: int) -> float:
  """`config.method_options.dp_sgd.delta`, by default `default_delta(N)`;
  refused above 1/N.

  delta is the probability that the epsilon guarantee fails outright; above
  1/N a mechanism that publishes one random example verbatim would qualify.
  Exactly 1/N is accepted when given (older tables used it), but the
  default is well below it (`default_delta`).

  Args:
    delta: the configured delta, or None for the default.
    num_examples: N, the number of training examples.

  Returns:
    delta in (0, 1/N].
  """
  if num_examples < 1:
    raise ValueError(f"num_examples = {num_examples}: the training split is "
                     "empty; differential privacy needs N >= 1 examples")
  if delta is None:
    return default_delta(num_examples)
  # Relative slack: 1/N written as a decimal (e.g. 0.0004 for N = 2500) must
  # not be refused for its last bit.
  if not 0 < delta or delta * num_examples > 1 + 1e-9:
    raise ValueError(
        f"config.method_options.dp_sgd.delta = {delta} must be in (0, 1/N] = (0, "
        f"{1 / num_examples:.3g}] for N = {num_examples} training examples; "
        "leave it unset (config.method_options.dp_sgd.delta <= 0) for "
        f"min(1e-5, 1/(N ln N)) = {default_delta(num_examples):.3g}, or "
        "choose a smaller value")
  return float(delta)


def _check(sampling_rate, noise_multiplier=None, steps=None, delta=None,
           target_epsilon=None):
  """Clear errors for out-of-range accounting inputs (config field names)."""
  if not 0 < sampling_rate <= 1:
    raise ValueError(
        f"sampling rate q = {sampling_rate} must be in (0, 1]: "
        "config.batch_size (the expected batch size) must be between 1 and the number "
        "of training examples")
  if noise_multiplier is not None and not noise_multiplier > 0:
    raise ValueError(f"config.method_options.dp_sgd.noise_multiplier = {noise_multiplier} "
                     "must be > 0 (0 gives no privacy: epsilon is infinite)")
  if steps is not None and (int(steps) != steps or steps < 0):
    raise ValueError(f"steps = {steps} must be a non-negative integer")
  if delta is not None and not 0 < delta < 1:
    raise ValueError(f"config.method_options.dp_sgd.delta = {delta} must be in (0, 1)")
  if target_epsilon is not None and not target_epsilon > 0:
    raise ValueError(f"config.method_options.dp_sgd.target_epsilon = {target_epsilon} must "
                     "be > 0")


def epsilon(*, sampling_rate: float, noise_multiplier: float, steps: int,
            delta: float, accountant: str = "rdp") -> float:
  """Epsilon spent at `delta` after `steps` DP-SGD steps.

  Args:
    sampling_rate: q, the Poisson inclusion probability of each example.
    noise_multiplier: sigma; the noise std is sigma * clip_norm.
    steps: the number of noised (logical-batch) updates.
    delta: the target delta.
    accountant: 'rdp' or 'pld'.

  Returns:
    epsilon (0 for 0 steps).
  """
  _check(sampling_rate, noise_multiplier, steps, delta)
  acc = make_accountant(accountant)
  if steps == 0:
    return 0.0
  if accountant == "rdp":
    orders, rdp_one = _rdp_of_one_step(float(sampling_rate),
                                       float(noise_multiplier))
    return float(rdp.rdp_privacy_accountant.compute_epsilon(
        orders, int(steps) * rdp_one, delta)[0])
  return float(acc.compose(
      dpsgd_event(sampling_rate, noise_multiplier, int(steps))).get_epsilon(
          delta))


@functools.lru_cache(maxsize=64)
def _rdp_of_one_step(sampling_rate: float, noise_multiplier: float):
  """(orders, RDP of one step at each order), computed once per (q, sigma).

  RDP composes by addition: `RdpAccountant.compose` of `steps` steps adds
  `steps * rdp_one` to zeros, so `compute_epsilon(orders, steps * rdp_one)`
  is its epsilon bit for bit (tests/test_accounting.py), while the series
  behind `rdp_one` (~0.1-0.2 s) runs once per run instead of at every
  logged step and every probe of the step-budget search. Reads the
  accountant's `_orders` and `_rdp`: dp-accounting is pinned (setup.py).
  """
  acc = rdp.RdpAccountant()
  acc.compose(dpsgd_event(sampling_rate, noise_multiplier, 1))
  return acc._orders, acc._rdp.copy()  # pylint: disable=protected-access


def _solve(make_event, lo, hi, *, target_epsilon, delta, accountant,
           discrete, tol):
  """dp_accounting's Brent search for the boundary inside [lo, hi]."""
  return dp_accounting.calibrate_dp_mechanism(
      make_fresh_accountant=lambda: make_accountant(accountant),
      make_event_from_param=make_event, target_epsilon=target_epsilon,
      target_delta=delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
      discrete=discrete, tol=tol)


def calibrate_noise_multiplier(*, target_epsilon: float, sampling_rate: float,
                               steps: int, delta: float,
                               accountant: str = "rdp",
                               tol: float = 1e-3) -> float:
  """The smallest sigma (within `tol`) whose `steps` steps spend <= target.

  Uses `dp_accounting.calibrate_dp_mechanism` (Brent's method; the returned
  sigma is guaranteed to meet the target). For PLD the bracket's upper end is
  the RDP answer (RDP is an upper bound on PLD), which saves slow PLD
  evaluations at large sigma.

  Args:
    target_epsilon: the epsilon the whole run may spend.
    sampling_rate: q.
    steps: the planned number of steps.
    delta: the target delta.
    accountant: 'rdp' or 'pld'.
    tol: absolute tolerance on sigma: the result is in [sigma*, sigma* + tol].

  Returns:
    sigma with epsilon(sigma) <= target_epsilon.
  """
  _check(sampling_rate, None, steps, delta, target_epsilon)
  make_accountant(accountant)  # validates the name
  if steps == 0:
    raise ValueError("steps = 0: no noise multiplier to calibrate for a run "
                     "without training steps")

  def gap(sigma):
    return epsilon(sampling_rate=sampling_rate, noise_multiplier=sigma,
                   steps=steps, delta=delta, accountant=accountant) - (
                       target_epsilon)

  if accountant == "pld":  # PLD needs ~10-30% less noise than RDP
    hi, shrink = calibrate_noise_multiplier(
        target_epsilon=target_epsilon, sampling_rate=sampling_rate,
        steps=steps, delta=delta, accountant="rdp", tol=tol), 0.75
  else:
    hi, shrink = 1.0, 0.5
  while gap(hi) > 0:
    hi *= 2
    if hi > 1e6:
      raise ValueError(
          f"config.method_options.dp_sgd.target_epsilon = {target_epsilon} cannot be met "
          f"with sigma <= 1e6 over {steps} steps at q = {sampling_rate}")
  lo = hi * shrink
  # Below sigma ~ 0.1 the PLD accountant takes minutes per evaluation and no
  # useful DP training runs there; refuse rather than hang.
  while gap(lo) <= 0:
    if lo < 0.1:
      raise ValueError(
          f"config.method_options.dp_sgd.target_epsilon = {target_epsilon} is met with "
          f"noise_multiplier < 0.1 over {steps} steps at q = "
          f"{sampling_rate}: that epsilon is too large to be meaningful; "
          "set config.method_options.dp_sgd.noise_multiplier directly instead")
    hi, lo = lo, lo * shrink
  return float(_solve(lambda s: dpsgd_event(sampling_rate, s, steps), lo, hi,
                      target_epsilon=target_epsilon, delta=delta,
                      accountant=accountant, discrete=False, tol=tol))


def max_steps(*, target_epsilon: float, sampling_rate: float,
              noise_multiplier: float, delta: float,
              accountant: str = "rdp") -> int:
  """The largest number of steps that spends at most `target_epsilon`.

  A run stops before step `max_steps + 1`, which would exceed its budget.

  Returns:
    n >= 0 with epsilon(n) <= target < epsilon(n + 1).
  """
  _check(sampling_rate, noise_multiplier, None, delta, target_epsilon)

  def eps(n):
    return epsilon(sampling_rate=sampling_rate,
                   noise_multiplier=noise_multiplier, steps=n, delta=delta,
                   accountant=accountant)

  if eps(1) > target_epsilon:
    return 0
  if accountant == "pld":  # RDP's budget is a lower bound on PLD's
    lo = max_steps(target_epsilon=target_epsilon, sampling_rate=sampling_rate,
                   noise_multiplier=noise_multiplier, delta=delta,
                   accountant="rdp")
    lo = max(lo, 1)
  else:
    lo = 1
  hi = 2 * lo
  while eps(hi) <= target_epsilon:
    lo, hi = hi, 2 * hi
    if hi > 2**40:
      raise ValueError(f"config.method_options.dp_sgd.target_epsilon = {target_epsilon} "
                       "allows more than 2**40 steps")
  if accountant == "rdp":  # eps(n) is one array product: bisect exactly
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if eps(mid) <= target_epsilon else (lo, mid)
    return lo
  n = int(_solve(lambda n: dpsgd_event(sampling_rate, noise_multiplier, n),
                 lo, hi, target_epsilon=target_epsilon, delta=delta,
                 accountant=accountant, discrete=True, tol=1))
  # Brent returns a feasible integer within 1 of the real root; step to the
  # exact boundary (at most two more evaluations).
  while n > 0 and eps(n) > target_epsilon:
    n -= 1
  while eps(n + 1) <= target_epsilon:
    n += 1
  return n


def truncation_probability(*, num_examples: int, sampling_rate: float,
                           max_batch_size: int) -> float:
  """P[Binomial(N + 1, q) > max_batch_size]: the chance that one Poisson draw
  is cut to the padded batch (N + 1: the larger of two neighbouring data
  sets, whose chance is the larger)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.binom.sf(max_batch_size, num_examples + 1,
                              sampling_rate))


# Cached: a pure function of scalars that costs seconds (a run's summary
# and whoever reads it again ask for the same one).
@functools.lru_cache(maxsize=64)
def truncated_epsilon(*, num_examples: int, sampling_rate: float,
                      max_batch_size: int, noise_multiplier: float,
                      steps: int, delta: float) -> float:
  """Epsilon at `delta` of DP-SGD whose Poisson draws are cut to
  `max_batch_size` by a uniform random subset (what
  research/data/samplers/poisson.py does): dp_accounting's
  `TruncatedSubsampledGaussianDpEvent` under the PLD accountant (the
  analysis of "Tighter Privacy Analysis for Truncated Poisson Sampling",
  arXiv 2508.15089; RDP has no such event). Seconds to tens of seconds."""
  _check(sampling_rate, noise_multiplier, steps, delta)
  if steps == 0:
    return 0.0
  acc = make_accountant("pld")
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=num_examples, sampling_probability=sampling_rate,
          truncated_batch_size=int(max_batch_size),
          noise_multiplier=noise_multiplier), int(steps)))
  return float(acc.get_epsilon(delta))


@dataclasses.dataclass(frozen=True)
class DpSgdAccount:
  """A run's privacy parameters, fixed before training.

  Attributes:
    sampling_rate: q = expected_batch_size / num_examples.
    noise_multiplier: sigma (given or calibrated).
    delta: the delta every reported epsilon is at.
    accountant: 'rdp' or 'pld'.
    sampling: 'poisson' or 'shuffle' (accounted as Poisson; see `caveat`).
    target_epsilon: the budget, or None when sigma was given.
  """
  sampling_rate: float
  noise_multiplier: float
  delta: float
  accountant: str = "rdp"
  sampling: str = "poisson"
  target_epsilon: float | None = None

  @property
  def caveat(self) -> str | None:
    """`SHUFFLE_CAVEAT` for shuffled batches, else None."""
    return SHUFFLE_CAVEAT if self.sampling == "shuffle" else None

  def epsilon(self, steps: int) -> float:
    """Epsilon spent at `self.delta` after `steps` steps."""
    return epsilon(sampling_rate=self.sampling_rate,
                   noise_multiplier=self.noise_multiplier, steps=steps,
                   delta=self.delta, accountant=self.accountant)

  def max_steps(self) -> int | None:
    """Steps within `target_epsilon` (None: no target, no limit)."""
    if self.target_epsilon is None:
      return None
    return max_steps(target_epsilon=self.target_epsilon,
                     sampling_rate=self.sampling_rate,
                     noise_multiplier=self.noise_multiplier,
                     delta=self.delta, accountant=self.accountant)


def plan(*, num_examples: int, expected_batch_size: int, steps: int,
         target_epsilon: float | None = None,
         noise_multiplier: float | None = None, delta: float | None = None,
         accountant: str = "rdp", sampling: str = "poisson") -> DpSgdAccount:
  """A run's `DpSgdAccount` from `config.method_options.dp_sgd`-style fields.

  Exactly one of `target_epsilon` (sigma is calibrated for `steps`) and
  `noise_multiplier` is given.

  Args:
    num_examples: N, training examples.
    expected_batch_size: the mean logical batch size (q * N).
    steps: planned logical-batch steps.
    target_epsilon, noise_multiplier, delta, accountant, sampling: the
      `config.method_options.dp_sgd` fields of the same names.

  Returns:
    The account; for 'shuffle' sampling its `caveat` is logged as a warning.
  """
  if sampling not in SAMPLINGS:
    raise ValueError(f"config.method_options.dp_sgd.sampling = {sampling!r}; valid "
                     f"choices: {list(SAMPLINGS)}")
  make_accountant(accountant)
  if (target_epsilon is None) == (noise_multiplier is None):
    raise ValueError(
        "config.method_options.dp_sgd: set exactly one of target_epsilon (the noise "
        "multiplier is then calibrated) and noise_multiplier; got "
        f"target_epsilon = {target_epsilon}, noise_multiplier = "
        f"{noise_multiplier}")
  if not 1 <= expected_batch_size <= num_examples:
    raise ValueError(
        f"config.batch_size (the expected batch size) = {expected_batch_size} must be "
        f"in [1, N = {num_examples}]")
  delta = resolve_delta(delta, num_examples)
  q = expected_batch_size / num_examples
  if sampling == "shuffle":
    logging.warning("DP-SGD: %s (config.method_options.dp_sgd.sampling = 'shuffle'; use "
                    "'poisson' for the guarantee)", SHUFFLE_CAVEAT)
  if noise_multiplier is None:
    noise_multiplier = calibrate_noise_multiplier(
        target_epsilon=target_epsilon, sampling_rate=q, steps=steps,
        delta=delta, accountant=accountant)
  else:
    _check(q, noise_multiplier)
  return DpSgdAccount(q, float(noise_multiplier), delta, accountant, sampling,
                      target_epsilon)
