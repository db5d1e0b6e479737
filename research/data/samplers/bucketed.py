"""Length-grouped random batches: the default training order.

Each epoch the examples are shuffled with a generator seeded by (seed,
epoch) and a random remainder past a whole number of batches is dropped
(steps per epoch is constant). Examples are then grouped by bucket over the
whole epoch and each bucket's (random) pool is cut into batches; the fewer
than batch_size left over in a bucket join the next bucket up. The batch
order is shuffled. Grouping per bucket over the epoch, rather than sorting
local chunks, pads almost every example only to its own bucket: chunk
sorting loses 5-10% to batches straddling two buckets and to each chunk's
longest examples.
"""

import numpy as np

CONFIG = {}


class Sampler:
  """See the module docstring."""

  def __init__(self, lengths, batch_size, *, seed=0):
    self.lengths = np.asarray(lengths)
    self.batch_size = batch_size
    self.seed = int(seed) % 2**64  # SeedSequence needs a non-negative seed.
    self.steps_per_epoch = len(self.lengths) // batch_size

  def epoch(self, epoch, buckets):
    steps, size = self.steps_per_epoch, self.batch_size
    rng = np.random.default_rng([self.seed, epoch])
    # Drop a random remainder first: what is left fills whole batches.
    perm = rng.permutation(len(self.lengths))[:steps * size]
    bucket = np.searchsorted(buckets, self.lengths[perm])
    parts, carry = [], perm[:0]
    for k in range(len(buckets)):
      # perm is random, so a bucket's pool is in random order; the few that
      # do not fill a batch move up to the next bucket.
      pool = np.concatenate([carry, perm[bucket == k]])
      full = len(pool) - len(pool) % size
      parts.append(pool[:full].reshape(-1, size))
      carry = pool[full:]
    return np.concatenate(parts)[rng.permutation(steps)]
