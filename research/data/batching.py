"""Fixed-shape numpy batches with length bucketing, resumable and sharded.

Every batch is padded to one of a few bucket lengths, so a jitted step
compiles once per bucket. Training batches have a fixed global size; each
epoch's batch order is a pure function of (seed, epoch), so `batch_at(step)`
gives the same batch on every host and after any restart. Each host takes
its contiguous slice of the global batch.

Batch format (numpy): input_ids, attention_mask, token_type_ids int32 [B, L];
labels int32 [B] (float32 for regression); weights float32 [B] (0 = padding
row, only in evaluation batches).
"""

import numpy as np

from research.data.errors import DataError


def make_buckets(buckets, max_length):
  """Returns the sorted bucket lengths, clipped to max_length, which is one.

  Args:
    buckets: the configured padded lengths (`data.buckets`).
    max_length: the truncation length (`data.max_length`).

  Returns:
    A sorted tuple of distinct lengths whose last element is max_length.
  """
  if any(int(b) <= 0 for b in buckets):
    raise DataError(f"data.buckets must be positive, got {tuple(buckets)}")
  return tuple(sorted({min(int(b), max_length) for b in buckets} |
                      {max_length}))


def auto_buckets(lengths, max_length, num_buckets=8, multiple=4):
  """Chooses the buckets that minimise padding for these example lengths.

  Exact dynamic programme over candidate lengths (multiples of `multiple`,
  and max_length): the padded total when every example is padded to its
  bucket is minimised for at most `num_buckets` buckets, max_length included.

  Args:
    lengths: example lengths (tokens, special tokens included).
    max_length: the truncation length; always the last bucket.
    num_buckets: the most buckets (compilations) to allow.
    multiple: candidate bucket lengths are multiples of this.

  Returns:
    A sorted tuple of bucket lengths, the last one max_length.
  """
  lengths = np.minimum(np.asarray(lengths, np.int64), max_length)
  cands = np.unique(np.append(np.arange(multiple, max_length, multiple),
                              max_length)).astype(np.float64)
  # below[j]: examples no longer than cands[j].
  below = np.searchsorted(np.sort(lengths), cands, side="right")
  # best[t][j]: least padded total for lengths <= cands[j] with exactly t + 1
  # buckets, the largest cands[j]; prev[t][j]: the bucket below it.
  best, prev = [cands * below], [None]
  upper = np.triu(np.ones((len(cands), len(cands)), bool), k=1)
  for _ in range(1, num_buckets):
    add = best[-1][:, None] + cands[None, :] * (below[None, :] -
                                                below[:, None])
    add = np.where(upper, add, np.inf)
    prev.append(add.argmin(axis=0))
    best.append(add.min(axis=0))
  j = len(cands) - 1
  t = int(np.argmin([b[j] for b in best]))  # Fewest buckets among the best.
  out = []
  while True:
    out.append(int(cands[j]))
    if t == 0:
      break
    j, t = int(prev[t][j]), t - 1
  return make_buckets(out, max_length)


def padding_efficiency(batches):
  """Returns real tokens / padded tokens over batches (in batch format).

  Padding rows (weights == 0) count as padding.
  """
  real = padded = 0
  for b in batches:
    real += int((b["attention_mask"] * (b["weights"][:, None] > 0)).sum())
    padded += b["attention_mask"].size
  return real / padded if padded else 0.0


class Batcher:
  """Builds training and evaluation batches from a tokenised split.

  Training (`batch_at`, `iterate`): each epoch the examples are shuffled with
  a generator seeded by (seed, epoch) and a random remainder past a whole
  number of batches is dropped (steps per epoch is constant). Examples are
  then grouped by bucket over the whole epoch and each bucket's (random) pool
  is cut into batches; the fewer than batch_size left over in a bucket join
  the next bucket up. The batch order is shuffled. Each batch is padded to
  the smallest bucket that fits its longest example. Grouping per bucket
  over the epoch, rather than sorting local chunks, pads almost every example
  only to its own bucket: chunk sorting loses 5-10% to batches straddling two
  buckets and to each chunk's longest examples. With shuffle=False the
  batches follow the split's order.

  Evaluation (`eval_batches`): every example exactly once, in order; the last
  batch is filled with padding rows (weights 0).

  Args:
    split: a `TokenizedSplit` (needs input_ids, token_type_ids, offsets,
      labels, max_length).
    batch_size: the global batch size (all hosts together).
    buckets: padded lengths (see `make_buckets`); empty: `auto_buckets` of
      this split's lengths.
    seed: the data-order seed.
    shuffle: shuffle and group by length (training); False keeps the order.
    process_index: this host's index.
    process_count: the number of hosts; must divide batch_size.
    pad_id: the token id of padding (BERT: 0).
  """

  def __init__(self, split, batch_size, buckets, seed=0, shuffle=True,
               process_index=0, process_count=1, pad_id=0):
    if batch_size <= 0 or batch_size % process_count:
      raise DataError(f"batch size {batch_size} must be positive and "
                      f"divisible by the number of hosts ({process_count})")
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index {process_index} is not in "
                      f"[0, {process_count})")
    self.split = split
    self.batch_size = batch_size
    self.seed = int(seed) % 2**64  # SeedSequence needs a non-negative seed.
    self.shuffle = shuffle
    self.process_index = process_index
    self.process_count = process_count
    self.pad_id = pad_id
    self.lengths = np.diff(split.offsets)
    if len(buckets):
      self.buckets = make_buckets(buckets, split.max_length)
    else:
      self.buckets = auto_buckets(self.lengths, split.max_length)
    if len(self.lengths) and self.lengths.max() > self.buckets[-1]:
      raise DataError(f"an example of {self.lengths.max()} tokens is longer "
                      f"than the largest bucket {self.buckets[-1]}")
    self._plan_cache = None

  @property
  def local_batch_size(self):
    """Rows of each batch on this host."""
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self):
    """Training batches per epoch (the remainder is dropped)."""
    steps = len(self.lengths) // self.batch_size
    if steps == 0:
      raise DataError(f"{self.split.where}: {len(self.lengths)} examples, "
                      f"fewer than one batch of {self.batch_size}")
    return steps

  @property
  def num_eval_batches(self):
    """Evaluation batches: ceil(examples / batch_size)."""
    return -(-len(self.lengths) // self.batch_size)

  def _bucket(self, longest):
    """The smallest bucket >= longest (elementwise)."""
    return np.asarray(self.buckets)[
        np.searchsorted(self.buckets, longest, side="left")]

  def _plan(self, epoch):
    """Returns (example indices [steps, B], padded lengths [steps])."""
    if self._plan_cache is not None and self._plan_cache[0] == epoch:
      return self._plan_cache[1]
    steps, size = self.steps_per_epoch, self.batch_size
    if not self.shuffle:
      order = np.arange(steps * size).reshape(steps, size)
    else:
      rng = np.random.default_rng([self.seed, epoch])
      # Drop a random remainder first: what is left fills whole batches.
      perm = rng.permutation(len(self.lengths))[:steps * size]
      bucket = np.searchsorted(self.buckets, self.lengths[perm])
      parts, carry = [], perm[:0]
      for k in range(len(self.buckets)):
        # perm is random, so a bucket's pool is in random order; the few
        # that do not fill a batch move up to the next bucket.
        pool = np.concatenate([carry, perm[bucket == k]])
        full = len(pool) - len(pool) % size
        parts.append(pool[:full].reshape(-1, size))
        carry = pool[full:]
      order = np.concatenate(parts)[rng.permutation(steps)]
    widths = self._bucket(self.lengths[order].max(axis=1))
    self._plan_cache = (epoch, (order, widths))
    return order, widths

  def batch_at(self, step):
    """Returns this host's part of global training batch `step`.

    Step s is batch s % steps_per_epoch of epoch s // steps_per_epoch.
    """
    epoch, i = divmod(int(step), self.steps_per_epoch)
    order, widths = self._plan(epoch)
    lo = self.process_index * self.local_batch_size
    return self._assemble(order[i, lo:lo + self.local_batch_size], widths[i])

  def iterate(self, start_step=0, num_steps=None):
    """Yields training batches from `start_step` on (forever by default).

    Args:
      start_step: the global step of the first batch (resume from here).
      num_steps: stop after this many batches; None: never stop.
    """
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch_at(step)
      step += 1

  def __iter__(self):
    return self.iterate(0)

  def padding_efficiency(self, epoch=0):
    """Real tokens / padded tokens of one training epoch's batches."""
    order, widths = self._plan(epoch)
    return float(self.lengths[order].sum() / (widths.sum() * self.batch_size))

  def eval_batches(self):
    """Yields this host's part of each evaluation batch.

    The global batches cover every example exactly once, in the split's
    order; padding rows (weights 0) fill the last one.
    """
    n, size = len(self.lengths), self.batch_size
    lo = self.process_index * self.local_batch_size
    for start in range(0, n, size):
      global_idx = np.arange(start, start + size)
      global_idx[global_idx >= n] = -1
      width = self._bucket(self.lengths[global_idx[global_idx >= 0]].max())
      yield self._assemble(global_idx[lo:lo + self.local_batch_size], width)

  def _assemble(self, idx, width):
    """Pads examples `idx` (-1: a padding row) to [len(idx), width]."""
    real = idx >= 0
    safe = np.where(real, idx, 0)
    starts = self.split.offsets[safe]
    lens = np.where(real, self.lengths[safe], 0)
    pos = np.arange(width)
    mask = pos[None, :] < lens[:, None]
    gather = np.where(mask, starts[:, None] + pos[None, :], 0)
    input_ids = np.where(mask, self.split.input_ids[gather], self.pad_id)
    token_type_ids = np.where(mask, self.split.token_type_ids[gather], 0)
    attention_mask = mask.astype(np.int32)
    # A padding row attends to one token: a fully masked row can give NaN
    # logits, and NaN * weight 0 is still NaN in a weighted sum.
    attention_mask[~real, 0] = 1
    labels = np.where(real, self.split.labels[safe], 0).astype(
        self.split.labels.dtype)
    return {
        "input_ids": input_ids.astype(np.int32),
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids.astype(np.int32),
        "labels": labels,
        "weights": real.astype(np.float32),
    }
