"""Poisson sampling: every example in each batch independently, at rate q.

The sampling DP-SGD's privacy accounting assumes (Abadi et al., 2016;
`dp_accounting`'s Poisson-sampled Gaussian mechanism): batch t holds each of
the n examples with probability q = batch_size / n, independently of the
other examples and batches, so its size varies around batch_size. A jitted
step needs one shape, so each batch is padded with weight-0 rows to a fixed
`max_batch_size`. A draw larger than that (a tail event: with the default,
beyond about 4 standard deviations) is cut to a random subset of that size
and counted in `Sampler.truncated`; an accountant should be told.

An "epoch" here is n // batch_size batches, so that num_epochs keeps its
meaning: each example is drawn about once per epoch on average.
"""

import math

import numpy as np

from research.configs.plugins import ConfigError

# max_batch_size: the padded batch; 0 = batch_size + 4 sqrt(batch_size),
# rounded up to a multiple of gcd(batch_size, 128) (so the data-parallel
# sizes that divide batch_size and 128 divide it too).
CONFIG = {"max_batch_size": 0}


class Sampler:
  """See the module docstring."""

  def __init__(self, lengths, batch_size, *, seed=0, max_batch_size=0):
    self.num_examples = len(lengths)
    self.expected_batch_size = batch_size
    self.seed = int(seed) % 2**64  # SeedSequence needs a non-negative seed.
    self.steps_per_epoch = self.num_examples // batch_size
    self.rate = batch_size / max(self.num_examples, 1)
    if max_batch_size <= 0:
      multiple = math.gcd(batch_size, 128)
      want = batch_size + 4 * math.sqrt(batch_size)
      max_batch_size = multiple * math.ceil(want / multiple)
    if max_batch_size < batch_size:
      raise ConfigError(
          f"config.data.sampler_options.max_batch_size={max_batch_size} is "
          f"smaller than the expected batch {batch_size}")
    self.batch_size = int(max_batch_size)
    self.truncated = {}  # epoch -> batches cut to max_batch_size

  def epoch(self, epoch, buckets=None):
    del buckets
    rng = np.random.default_rng([self.seed, epoch])
    order = np.full((self.steps_per_epoch, self.batch_size), -1, np.int64)
    cut = 0
    for step in range(self.steps_per_epoch):
      # A binomial count, then a uniform subset of that size: the same law
      # as n independent coin flips, at O(batch) cost per batch.
      count = int(rng.binomial(self.num_examples, self.rate))
      if count > self.batch_size:
        count, cut = self.batch_size, cut + 1
      order[step, :count] = rng.choice(self.num_examples, count,
                                       replace=False)
    self.truncated[epoch] = cut
    return order
