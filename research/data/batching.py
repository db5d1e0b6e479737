"""Fixed-shape numpy batches with length bucketing, resumable and sharded.

Every batch is padded to one of a few bucket lengths, so a jitted step
compiles once per bucket. Training batches have a fixed global size; each
epoch's batch order is a pure function of (seed, epoch), so `batch_at(step)`
gives the same batch on every host and after any restart. Each host takes
its contiguous slice of the global batch.

Batch format (numpy): input_ids, attention_mask, token_type_ids int32 [B, L];
labels int32 [B] (float32 for regression); weights float32 [B] (0 = padding
row, only in evaluation batches).

Packed training batches (`examples_per_row = K > 1`) put K examples back to
back in each of R = B / K rows: input_ids, attention_mask, token_type_ids and
segment_ids int32 [R, L] (segment k = 1..K is the row's k-th example, 0 is
padding); example_starts int32 [R, K], where each example's [CLS] is; labels
and weights [B] in row-major order (row r holds examples r*K .. r*K + K - 1),
so a data-sharded batch keeps every example with its row. The model turns
segment_ids into a block-diagonal attention mask and per-example positions.
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


def example_lengths(batch):
  """Tokens of each real example (weight > 0) of a batch, packed or not."""
  if "segment_ids" in batch:
    k = batch["example_starts"].shape[1]
    seg = batch["segment_ids"]
    counts = (seg[:, :, None] == np.arange(1, k + 1)).sum(1).reshape(-1)
  else:
    counts = batch["attention_mask"].sum(1)
  return counts[batch["weights"] > 0]


def padding_efficiency(batches):
  """Returns real tokens / padded tokens over batches (in batch format).

  Padding rows (weights == 0) count as padding.
  """
  real = padded = 0
  for b in batches:
    real += int(example_lengths(b).sum())
    padded += b["attention_mask"].size
  return real / padded if padded else 0.0


def pack_rows(lengths, rows):
  """Splits each batch's examples into `rows` rows of equal count, balanced.

  Greedy longest-first (LPT): each example, longest first, goes to the row
  with the fewest tokens among those not yet full. Every row gets exactly
  B / rows examples, so a packed batch has a fixed [rows, B / rows] example
  layout. The longest row sets the padded width; on random batches of
  sentences it ends a few percent above the mean row (the equal-count rule
  can force more when a few examples are very long).

  Args:
    lengths: int [S, B], the example lengths of S batches.
    rows: rows per batch; must divide B.

  Returns:
    (order [S, B]: positions into each batch, row-major (row r is
    order[:, r*K:(r+1)*K], longest first); row_lengths [S, rows]).
  """
  lengths = np.asarray(lengths, np.int64)
  steps, size = lengths.shape
  per_row = size // rows
  by_length = np.argsort(-lengths, axis=1, kind="stable")
  load = np.zeros((steps, rows), np.int64)
  count = np.zeros((steps, rows), np.int64)
  slot = np.zeros((steps, size), np.int64)
  batch = np.arange(steps)
  # One pass per rank, vectorised over batches.
  for rank in range(size):
    pos = by_length[:, rank]
    row = np.where(count < per_row, load, np.iinfo(np.int64).max).argmin(1)
    slot[batch, row * per_row + count[batch, row]] = pos
    load[batch, row] += lengths[batch, pos]
    count[batch, row] += 1
  return slot, load


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

  Packed training (`examples_per_row` > 1): each epoch's batches are random
  (no length grouping: packing absorbs the length spread), each batch's
  examples are split into rows of equal count by `pack_rows`, and the batch
  is padded to the smallest bucket that fits its longest row.

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
    process_count: the number of hosts; must divide batch_size (with
      packing: the rows).
    pad_id: the token id of padding (BERT: 0).
    examples_per_row: K > 1 packs training batches (see the module
      docstring): batches are random (no length grouping) and `buckets` are
      row lengths, at most K * max_length. Evaluation batches are never
      packed.
  """

  def __init__(self, split, batch_size, buckets, seed=0, shuffle=True,
               process_index=0, process_count=1, pad_id=0, examples_per_row=1):
    per_row = int(examples_per_row)
    if per_row < 1 or batch_size % per_row:
      raise DataError(f"data.examples_per_row={examples_per_row} must be "
                      f">= 1 and divide the batch size {batch_size}")
    units = batch_size // per_row  # rows of a batch; hosts split them
    if batch_size <= 0 or units % process_count:
      raise DataError(f"batch size {batch_size} must be positive and its "
                      + ("rows" if per_row > 1 else "examples") +
                      f" divisible by the number of hosts ({process_count})")
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
    self.examples_per_row = per_row
    self.lengths = np.diff(split.offsets)
    self._plan_cache = None
    longest = split.max_length * per_row
    if len(buckets):
      self.buckets = make_buckets(buckets, longest)
    elif self.packed:
      # What is padded is each batch's longest row. Sample enough epochs'
      # batches that the rare long ones are seen (a small set's epoch 0
      # alone missed rows that later epochs padded to K * max_length).
      epochs = min(20, -(-2000 // self.steps_per_epoch))
      widest = np.concatenate([self._pack(e)[1].max(axis=1)
                               for e in range(epochs)])
      self.buckets = auto_buckets(widest, longest)
    else:
      self.buckets = auto_buckets(self.lengths, split.max_length)
    if not self.packed and len(self.lengths) and \
        self.lengths.max() > self.buckets[-1]:
      raise DataError(f"an example of {self.lengths.max()} tokens is longer "
                      f"than the largest bucket {self.buckets[-1]}")

  @property
  def packed(self):
    """Whether training batches pack several examples per row."""
    return self.examples_per_row > 1

  @property
  def local_batch_size(self):
    """Examples of each batch on this host (packed: its rows x K)."""
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

  def _pack(self, epoch):
    """Random batches packed into rows: (order [steps, B], row lengths)."""
    steps, size = self.steps_per_epoch, self.batch_size
    if self.shuffle:
      order = np.random.default_rng([self.seed, epoch]).permutation(
          len(self.lengths))[:steps * size].reshape(steps, size)
    else:
      order = np.arange(steps * size).reshape(steps, size)
    slot, row_lengths = pack_rows(self.lengths[order],
                                  size // self.examples_per_row)
    return np.take_along_axis(order, slot, axis=1), row_lengths

  def _plan(self, epoch):
    """Returns (example indices [steps, B], padded lengths [steps])."""
    if self._plan_cache is not None and self._plan_cache[0] == epoch:
      return self._plan_cache[1]
    steps, size = self.steps_per_epoch, self.batch_size
    if self.packed:
      order, row_lengths = self._pack(epoch)
      widths = self._bucket(row_lengths.max(axis=1))
      self._plan_cache = (epoch, (order, widths))
      return order, widths
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
    idx = order[i, lo:lo + self.local_batch_size]
    if self.packed:
      return self._assemble_packed(idx, widths[i])
    return self._assemble(idx, widths[i])

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

  def planned_widths(self, start_step, num_steps):
    """The padded width of each training batch in [start_step, +num_steps).

    Known in advance because the plan is a function of (seed, epoch): the
    trainer compiles every width before the first step, so that no bucket
    first met in a later epoch stalls the run with a compile.

    Returns:
      {width: the first step in the range with a batch of that width}.
    """
    first = {}
    step, end = int(start_step), int(start_step) + int(num_steps)
    # Planning an epoch of a large set takes a while: stop once every bucket
    # has turned up.
    while step < end and len(first) < len(self.buckets):
      epoch, i = divmod(step, self.steps_per_epoch)
      widths = self._plan(epoch)[1][i:i + end - step]
      for offset, width in enumerate(widths.tolist()):
        first.setdefault(width, step + offset)
      step += len(widths)
    return first

  def padding_efficiency(self, epoch=0):
    """Real tokens / padded tokens of one training epoch's batches."""
    order, widths = self._plan(epoch)
    rows = self.batch_size // self.examples_per_row
    return float(self.lengths[order].sum() / (widths.sum() * rows))

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

  def _assemble_packed(self, idx, width):
    """Packs examples `idx` (row-major, K per row) into [len(idx) / K, width]."""
    per_row = self.examples_per_row
    rows = len(idx) // per_row
    lens = self.lengths[idx].reshape(rows, per_row)
    starts = np.cumsum(lens, axis=1) - lens  # each example's offset in its row
    used = lens.sum(axis=1)  # <= width: K * max_length is always a bucket
    # Every token of the row: which example (segment) and which of its tokens.
    pos = np.arange(width)
    segment = (pos[None, :, None] >= starts[:, None, :]).sum(axis=2)  # 1..K
    segment = np.where(pos[None, :] < used[:, None], segment, 0)
    k = np.maximum(segment - 1, 0)
    example = np.take_along_axis(idx.reshape(rows, per_row), k, axis=1)
    within = pos[None, :] - np.take_along_axis(starts, k, axis=1)
    real = segment > 0
    gather = np.where(real, self.split.offsets[example] + within, 0)
    labels = self.split.labels[idx]
    return {
        "input_ids": np.where(real, self.split.input_ids[gather],
                              self.pad_id).astype(np.int32),
        "attention_mask": real.astype(np.int32),
        "token_type_ids": np.where(real, self.split.token_type_ids[gather],
                                   0).astype(np.int32),
        "segment_ids": segment.astype(np.int32),
        "example_starts": starts.astype(np.int32),
        "labels": labels.astype(self.split.labels.dtype),
        "weights": np.ones(len(idx), np.float32),
    }
