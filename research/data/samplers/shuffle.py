"""Uniform random batches: a fresh permutation of the examples per epoch."""

import numpy as np

CONFIG = {}


class Sampler:
  """Each epoch a permutation seeded by (seed, epoch), cut into batches.

  The fewer than `batch_size` examples left over are dropped (a random
  remainder), so steps per epoch is constant. No length grouping: for
  packed rows (packing absorbs the length spread) and for experiments that
  need i.i.d. batches.
  """

  def __init__(self, lengths, batch_size, *, seed=0):
    self.num_examples = len(lengths)
    self.batch_size = batch_size
    self.seed = int(seed) % 2**64  # SeedSequence needs a non-negative seed.
    self.steps_per_epoch = self.num_examples // batch_size

  def epoch(self, epoch, buckets=None):
    del buckets
    steps, size = self.steps_per_epoch, self.batch_size
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples)[:steps * size].reshape(steps, size)
