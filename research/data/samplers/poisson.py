"""Poisson sampling: every example in each batch independently, at rate q.

The sampling DP-SGD's privacy accounting assumes (Abadi et al., 2016;
`dp_accounting`'s Poisson-sampled Gaussian mechanism): batch t holds each of
the n examples with probability q = batch_size / n, independently of the
other examples and batches, so its size varies around batch_size. A jitted
step needs one shape, so each batch is padded with weight-0 rows to a fixed
`max_batch_size`. A draw larger than that (a tail event: with the default,
beyond about 4 standard deviations) is cut to a random subset of that size
and counted: `Sampler.truncated` per epoch, `truncated_draws(steps)` over a
run's first steps (DP-SGD logs it and accounts the cut sampler:
research/methods/dp_sgd.py).

An "epoch" here is n // batch_size batches, so that num_epochs keeps its
meaning: each example is drawn about once per epoch on average.

With gradient accumulation a logical batch must be one draw (an example in
two micro-batches of one update would count twice): `micro_batches = k`
makes each draw at rate k * batch_size / n, padded to k * max_batch_size and
split in order into k consecutive batches of max_batch_size rows (DP-SGD
sets it to `config.optimizer.grad_accum_steps`).
"""

import math

import numpy as np

from research.configs.plugins import ConfigError

# max_batch_size: the padded batch; 0 = batch_size + 4 sqrt(batch_size),
# rounded up to a multiple of gcd(batch_size, 128) (so the data-parallel
# sizes that divide batch_size and 128 divide it too); with micro_batches k,
# each batch's share of the draw's k * batch_size + 4 sqrt(k * batch_size).
# micro_batches: consecutive batches that form one draw (see above).
CONFIG = {"max_batch_size": 0, "micro_batches": 1}


class Sampler:
  """See the module docstring."""

  def __init__(self, lengths, batch_size, *, seed=0, max_batch_size=0,
               micro_batches=1):
    if micro_batches < 1:
      raise ConfigError(f"config.data.sampler_options.micro_batches="
                        f"{micro_batches} must be >= 1")
    k = self.micro_batches = int(micro_batches)
    self.num_examples = len(lengths)
    self.expected_batch_size = batch_size
    self.seed = int(seed) % 2**64  # SeedSequence needs a non-negative seed.
    self.steps_per_epoch = k * (self.num_examples // (k * batch_size))
    self.rate = k * batch_size / max(self.num_examples, 1)
    if max_batch_size <= 0:
      multiple = math.gcd(batch_size, 128)
      want = batch_size + 4 * math.sqrt(k * batch_size) / k
      max_batch_size = multiple * math.ceil(want / multiple)
    if max_batch_size < batch_size:
      raise ConfigError(
          f"config.data.sampler_options.max_batch_size={max_batch_size} is "
          f"smaller than the expected batch {batch_size}")
    self.batch_size = int(max_batch_size)
    self.truncated = {}  # epoch -> batches cut to max_batch_size
    self._cut = {}  # epoch -> indices of the cut draws within the epoch

  @property
  def max_draw(self) -> int:
    """The largest draw kept: a draw's `micro_batches` padded batches."""
    return self.micro_batches * self.batch_size

  def truncated_draws(self, steps: int) -> int:
    """Draws cut to `max_draw` among the first `steps` batches of the run.

    The plan is a function of (seed, epoch), so epochs not yet planned are
    planned here (the same draws the batcher will make).
    """
    per_epoch = self.steps_per_epoch
    if per_epoch == 0:
      return 0
    total = 0
    for epoch in range(-(-int(steps) // per_epoch)):
      if epoch not in self._cut:
        self.epoch(epoch)
      left = min(per_epoch, int(steps) - epoch * per_epoch)
      # A draw's first batch is draw * micro_batches of the epoch.
      total += int(np.sum(self._cut[epoch] * self.micro_batches < left))
    return total

  def epoch(self, epoch, buckets=None):
    del buckets
    rng = np.random.default_rng([self.seed, epoch])
    k = self.micro_batches
    draws, size = self.steps_per_epoch // k, k * self.batch_size
    order = np.full((draws, size), -1, np.int64)
    cut = []
    for step in range(draws):
      # A binomial count, then a uniform subset of that size: the same law
      # as n independent coin flips, at O(batch) cost per batch.
      count = int(rng.binomial(self.num_examples, self.rate))
      if count > size:
        count = size
        cut.append(step)
      order[step, :count] = rng.choice(self.num_examples, count,
                                       replace=False)
    self.truncated[epoch] = len(cut)
    self._cut[epoch] = np.asarray(cut, np.int64)
    return order.reshape(self.steps_per_epoch, self.batch_size)
