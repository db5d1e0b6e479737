"""DP-SGD: differentially private fine-tuning.

    config.methods = ("dp_sgd",)          # last, after any other method
    config.method_options.dp_sgd = dict(target_epsilon=8.0, clip_norm=1.0)

Each update (Abadi et al. 2016) takes a logical batch drawn by Poisson
sampling (each of the N training examples independently with probability
q = config.batch_size / N), clips every example's gradient to norm C, sums
them, adds Gaussian noise of std sigma * C once and divides by the expected
batch size config.batch_size (`research.methods.privacy.clipping`). The privacy
accountant (`research.methods.privacy.accounting`, dp-accounting's RDP or PLD) turns
(q, sigma, steps, delta) into the epsilon spent.

How it plugs into the one training core:

- `sampler`: the training order is the `sampling` option ("poisson",
  with one draw per logical batch under gradient accumulation; or
  "shuffle", accounted as Poisson with `accounting.SHUFFLE_CAVEAT` in every
  result). Length-bucketed batches (the default sampler) are refused: which
  examples share a batch would depend on their lengths.
- `setup`: with `target_epsilon` and no `noise_multiplier`, sigma is
  calibrated for the planned steps before anything compiles. The plan is
  saved as `<workdir>/privacy.json`; a resumed run reuses its sigma (and
  refuses changed privacy settings), so its epsilon continues. A restored
  run (export, predict) plans nothing.
- `grad_fn`: per-example gradients of the (method-wrapped) task loss in
  chunks of `chunk_size` examples, clipped and summed on each device, summed
  over devices, then the noise, whose key is a function of (seed, logical
  step) only: the same on every device, once per logical batch (on the last
  micro-batch under accumulation), reproduced on resume.
- `step_limit`: a run with a `target_epsilon` stops after the last step
  within it (more steps than planned, or a given sigma too small).
- `metrics`: `privacy/epsilon` spent at delta and `privacy/truncated_batches`
  (Poisson draws larger than the padded batch, cut to it), logged every log
  step and written to summary.json with the rest of the plan, the a-priori
  chance of a cut and the epsilon of the cut sampler (`_truncation`). The
  step logs the clipping: `dp/clip_fraction` and the mean and largest
  per-example gradient norm before clipping (`dp/example_grad_norm_*`).
- delta: by default min(1e-5, 1/(N ln N)), below 1/N
  (`accounting.default_delta`, with its sources).

Refused because they break the guarantee: packed rows (several examples
share a row: `data.examples_per_row` > 1), samplers other than
the `sampling` option, tasks that make several features of one example
(question answering's windows), and another method that replaces the
gradient function. Losses are computed one example at a time (a vmap over
single-example batches), so no statistic can cross examples.

Outside the guarantee (monitoring only, as in every DP-SGD library): the
logged training loss and gradient norm, and skipping an update whose loss is
non-finite (`config.max_bad_steps`), are computed from the private data
without noise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import ml_collections

from research import methods
from research.configs.plugins import ConfigError
from research.training import steps as steps_lib

try:
  from research.methods.privacy import accounting  # pylint: disable=g-import-not-at-top
  from research.methods.privacy import clipping  # pylint: disable=g-import-not-at-top
except ModuleNotFoundError as e:  # the optional extra
  raise ConfigError(f"config.methods 'dp_sgd' needs {e.name}: pip install "
                    "-e '.[privacy]' (dp-accounting, jax-privacy)") from e

log = logging.getLogger("research.methods.dp_sgd")

# The noise key stream: fold_in(fold_in(key(seed), NOISE_STREAM), step), apart
# from the dropout keys fold_in(key(seed), micro_step) and the transform's.
NOISE_STREAM = 0x7FFFFFFD
# chunk_size = 0: the largest divisor of the device's micro-batch up to this.
MAX_AUTO_CHUNK = 8
PLAN_FILE = "privacy.json"


def auto_chunk(rows: int, most: int = MAX_AUTO_CHUNK) -> int:
  """The largest divisor of `rows` that is at most `most`."""
  return max(c for c in range(1, min(rows, most) + 1) if rows % c == 0)


class Method(methods.Method):
  """See the module docstring."""
  # target_epsilon: the run's budget at delta (<= 0: none; noise_multiplier
  # given); with noise_multiplier < 0 the noise is calibrated before training
  # so the planned steps spend at most this, and a run that would exceed it
  # stops before it does. delta <= 0: min(1e-5, 1/(N ln N)), below 1/N
  # (accounting.default_delta; at most 1/N). clip_norm: C. clipping: flat
  # (each example's gradient cut to norm C) | automatic (each scaled to
  # C g / (|g| + stability): Bu et al. 2022's AUTO-S; privacy/clipping.py).
  # sampling: poisson (each example joins each logical batch independently:
  # the accountant's assumption) | shuffle (fixed-size shuffled batches,
  # accounted as Poisson with a caveat in every result). accountant: rdp |
  # pld (tighter, seconds per evaluation). chunk_size: per-example gradients
  # in memory at once (a divisor of the device's micro-batch; 0: the
  # largest divisor <= 8).
  CONFIG = {"target_epsilon": -1.0, "noise_multiplier": -1.0, "delta": -1.0,
            "clip_norm": 1.0, "sampling": "poisson", "accountant": "rdp",
            "chunk_size": 0, "clipping": "flat", "stability": 0.01}
  LAST = True  # per-example gradients of the loss the other methods made

  def __init__(self, config, **options):
    super().__init__(config, **options)
    where = "config.method_options.dp_sgd"
    p = ml_collections.ConfigDict(options)
    for field, valid in (("sampling", accounting.SAMPLINGS),
                         ("accountant", tuple(accounting.ACCOUNTANTS)),
                         ("clipping", clipping.CLIPPINGS)):
      if p[field] not in valid:
        raise ConfigError(f"{where}.{field}={p[field]!r}; valid: "
                          f"{', '.join(valid)}")
    if config.data.examples_per_row > 1:
      raise ConfigError(
          f"config.data.examples_per_row={config.data.examples_per_row} with "
          "DP-SGD: packed rows put several examples in one row, so "
          "clipping a row's gradient does not bound one example's influence; "
          "set config.data.examples_per_row=1")
    if p.clip_norm <= 0:
      raise ConfigError(f"{where}.clip_norm={p.clip_norm} must be > 0")
    if p.stability <= 0:
      raise ConfigError(f"{where}.stability={p.stability} must be > 0")
    if p.chunk_size < 0:
      raise ConfigError(f"{where}.chunk_size={p.chunk_size} must be "
                        ">= 0 (0: automatic)")
    if p.target_epsilon <= 0 and p.noise_multiplier < 0:
      raise ConfigError(
          f"{where}: set target_epsilon > 0 (the noise multiplier is then "
          "calibrated) or noise_multiplier >= 0")
    if p.target_epsilon > 0 and p.noise_multiplier == 0:
      raise ConfigError(
          f"{where}.target_epsilon={p.target_epsilon} with "
          "noise_multiplier=0: no noise spends an infinite epsilon at the "
          "first step")
    self.privacy = p
    self.accum = config.optimizer.grad_accum_steps
    self.account = None  # accounting.DpSgdAccount, set by setup
    self.limit = None
    self.poisson = None  # the Poisson sampler (truncation counts), by setup

  # --- Data order --------------------------------------------------------------------

  def sampler(self, name, options):
    want = self.privacy.sampling
    if name not in ("auto", want):
      why = {"bucketed": "length-bucketed batches group examples by length, "
                         "so which examples share a batch is not random"}
      raise ConfigError(
          f"config.data.sampler={name!r} with config.method_options.dp_sgd."
          f"sampling={want!r}: {why.get(name, 'the batches are not what the accountant assumes')}"
          "; leave config.data.sampler='auto' (the sampling option chooses "
          "the sampler)")
    options = dict(options.to_dict() if hasattr(options, "to_dict")
                   else options or {})
    if want == "poisson":
      given = options.get("micro_batches", self.accum)
      if given != self.accum:
        raise ConfigError(
            f"config.data.sampler_options.micro_batches={given} must equal "
            f"config.optimizer.grad_accum_steps={self.accum} under DP-SGD: a "
            "logical batch is one Poisson draw (leave it unset)")
      options["micro_batches"] = self.accum
    return want, options

  # --- The plan: sigma, delta, budget ---------------------------------------------

  def _settings(self, num_examples):
    """What fixes a run's accounting (a resumed run must keep it)."""
    return {"privacy": dict(self.options), "num_examples": num_examples,
            "batch_size": self.config.batch_size}

  def setup(self, context):
    if not context.training:
      return None  # a restored run: nothing to plan
    train_split, total_steps, workdir = (
        context.train_split, context.total_steps, context.workdir)
    sampler = getattr(context.train_batches, "sampler", None)
    self.poisson = sampler if hasattr(sampler, "truncated_draws") else None
    n = len(train_split)
    sources = len(set(train_split.rows.tolist()))
    if sources < n:
      raise ConfigError(
          f"DP-SGD: the training split has {n} features from "
          f"{sources} examples (e.g. question answering's windows over a long "
          "context): an example's influence spans several clipped gradients; "
          "DP-SGD here needs one feature per example (raise "
          "config.data.max_length or shorten the texts)")
    p = self.privacy
    settings = self._settings(n)
    path = os.path.join(workdir, PLAN_FILE) if workdir else None
    saved = None
    if path and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
      if saved["settings"] != settings:
        raise ConfigError(
            f"{path}: this workdir's run has privacy settings "
            f"{saved['settings']}, the config {settings}; a resumed run must "
            "keep config.method_options.dp_sgd, config.batch_size and the "
            "training data (use a new workdir)")
    try:
      if saved is not None:
        self.account = accounting.DpSgdAccount(**saved["account"])
      else:
        sigma = p.noise_multiplier if p.noise_multiplier >= 0 else None
        target = p.target_epsilon if p.target_epsilon > 0 else None
        # plan() takes one of the two (a given sigma with a target is a
        # budget) and refuses sigma 0 (no privacy), set after it.
        account = accounting.plan(
            num_examples=n, expected_batch_size=self.config.batch_size,
            steps=total_steps, target_epsilon=target if sigma is None else None,
            noise_multiplier=None if sigma is None else (sigma or 1.0),
            delta=p.delta if p.delta > 0 else None, accountant=p.accountant,
            sampling=p.sampling)
        self.account = dataclasses.replace(
            account, target_epsilon=target,
            noise_multiplier=account.noise_multiplier if sigma is None
            else sigma)
    except ValueError as e:  # accounting names the config.method_options.dp_sgd field
      raise ConfigError(str(e)) from e
    if path and saved is None and jax.process_index() == 0:
      with open(path, "w", encoding="utf-8") as f:
        json.dump({"settings": settings,
                   "account": dataclasses.asdict(self.account)}, f, indent=2)
    a = self.account
    if a.noise_multiplier == 0:
      log.warning("DP-SGD with noise_multiplier=0: clipped "
                  "per-example gradients, no noise, no privacy (epsilon inf)")
    self.limit = None
    if a.target_epsilon is not None:
      budget = a.max_steps()
      if budget < total_steps:
        self.limit = (budget, (
            f"step {budget + 1} would spend epsilon "
            f"{a.epsilon(budget + 1):.4g} > config.method_options.dp_sgd."
            f"target_epsilon="
            f"{a.target_epsilon} at delta={a.delta:.3g} (noise multiplier "
            f"{a.noise_multiplier:.4g}, q={a.sampling_rate:.4g})"))
    log.info("DP-SGD: N=%d, q=%.4g, noise multiplier %.4f%s, C=%g, delta=%.3g, "
             "%s accountant: epsilon %.4g after the planned %d steps%s", n,
             a.sampling_rate, a.noise_multiplier,
             "" if p.noise_multiplier >= 0 else " (calibrated)", p.clip_norm,
             a.delta, a.accountant, self.epsilon(total_steps), total_steps,
             f"; {a.caveat}" if a.caveat else "")

  def epsilon(self, step):
    """Epsilon spent at the account's delta after `step` updates."""
    if self.account.noise_multiplier == 0:
      return 0.0 if step == 0 else math.inf
    return self.account.epsilon(step)

  def step_limit(self):
    return self.limit

  def truncated(self, step):
    """Poisson draws cut to the padded batch in the first `step` updates."""
    if self.poisson is None:
      return None
    return self.poisson.truncated_draws(step * self.accum)

  def metrics(self, step):
    out = {"privacy/epsilon": self.epsilon(step)}
    cut = self.truncated(step)
    if cut is not None:
      out["privacy/truncated_batches"] = cut
    return out

  def summary(self, step):
    a = self.account
    out = {"privacy/epsilon": self.epsilon(step), "privacy/delta": a.delta,
           "privacy/noise_multiplier": a.noise_multiplier,
           "privacy/sampling_rate": a.sampling_rate,
           "privacy/clip_norm": self.privacy.clip_norm,
           "privacy/clipping": self.privacy.clipping,
           "privacy/steps": step, "privacy/accountant": a.accountant,
           "privacy/sampling": a.sampling}
    if a.target_epsilon is not None:
      out["privacy/target_epsilon"] = a.target_epsilon
    if a.caveat:
      out["privacy/caveat"] = a.caveat
    if self.poisson is not None:
      out.update(self._truncation(step))
    return out

  def _truncation(self, step):
    """What Poisson draws cut to the padded batch did to the guarantee.

    The accountant's event is uncut Poisson sampling. The sampler cuts a
    draw larger than its padded batch to a uniform random subset
    (research/data/samplers/poisson.py): `truncated_batches` counts the
    cut draws of this run (monitoring, as the loss is), the probability
    of a cut per draw is a priori, and the epsilon of the mechanism that
    ran, cut draws included, comes from dp_accounting's
    `TruncatedSubsampledGaussianDpEvent` (PLD; arXiv 2508.15089) at the
    same delta.
    """
    a, sampler = self.account, self.poisson
    n = sampler.num_examples
    out = {"privacy/truncated_batches": self.truncated(step),
           "privacy/max_batch_size": sampler.max_draw,
           "privacy/truncation_probability": accounting.truncation_probability(
               num_examples=n, sampling_rate=a.sampling_rate,
               max_batch_size=sampler.max_draw)}
    if a.noise_multiplier > 0 and a.sampling == "poisson" and step > 0:
      out["privacy/epsilon_truncated_sampler"] = accounting.truncated_epsilon(
          num_examples=n, sampling_rate=a.sampling_rate,
          max_batch_size=sampler.max_draw,
          noise_multiplier=a.noise_multiplier, steps=step, delta=a.delta)
    return out

  # --- The gradient ------------------------------------------------------------------

  def grad_fn(self, grad_fn):
    if grad_fn is not steps_lib.value_and_grad:
      raise ConfigError(
          "DP-SGD: another method in config.methods replaces the "
          "gradient function; DP-SGD computes per-example gradients of the "
          "loss itself and cannot compose with it (wrap_loss methods work)")
    return self._grad_fn

  def _grad_fn(self, loss_fn):
    """`loss_fn -> StepGradFn`: per-example clipping, noise once per batch."""
    if self.account is None:
      raise RuntimeError("dp_sgd.Method.setup must run before the step "
                         "is built (train.build calls it)")
    p, a, accum = self.privacy, self.account, self.accum
    noise_base = jax.random.fold_in(steps_lib.root_key(self.config),
                                    NOISE_STREAM)

    def fn(params, frozen, batch, key, *, micro_step, axis_name):
      rows = batch["weights"].shape[0]

      def per_example(trainable, example, example_key):
        return loss_fn(trainable, frozen, example, example_key)[0]

      value_and_grads = clipping.dp_value_and_grad(
          per_example, clip_norm=p.clip_norm,
          noise_multiplier=a.noise_multiplier,
          # MultiSteps averages the accum micro-batch gradients: each is
          # divided by a 1/accum share of the expected batch.
          expected_batch_size=self.config.batch_size / accum,
          chunk_size=p.chunk_size or auto_chunk(rows), axis_name=axis_name,
          clipping=p.clipping, stability=p.stability)
      step, micro = jax.numpy.divmod(micro_step, accum)
      loss, grads, aux = value_and_grads(
          params, batch, key, noise_key=jax.random.fold_in(noise_base, step),
          noise_scale=(micro == accum - 1).astype(jax.numpy.float32))
      return (loss, {"weight": aux["num_examples"],
                     "clip_fraction": aux["clip_fraction"],
                     "metrics": aux["metrics"]}), grads

    return steps_lib.StepGradFn(fn)
