"""Fixed-shape numpy batches with length bucketing, resumable and sharded.

Every batch is padded to one of a few bucket lengths, so a jitted step
compiles once per bucket. Training batches have a fixed global size; each
epoch's batch order comes from a sampler (`research.data.samplers`) and is a
pure function of (seed, epoch), so `batch_at(step)` gives the same batch on
every host and after any restart. Each host takes its contiguous slice of
the global batch.

Batch format (numpy): every field of the split (`TokenizedSplit.fields`),
gathered and padded by its spec: per-token fields [B, L] (input_ids,
token_type_ids int32; token labels, offsets, ...), per-feature fields
[B, ...] (labels int32, or float32 for regression; answer positions, ...);
plus attention_mask int32 [B, L] and weights float32 [B] (0 = padding row:
the last evaluation batch, a Poisson batch's unused rows).

Packed training batches (`examples_per_row = K > 1`) put K examples back to
back in each of R = B / K rows: per-token fields and segment_ids int32
[R, L] (segment k = 1..K is the row's k-th example, 0 is padding);
example_starts int32 [R, K], where each example's [CLS] is; per-feature
fields and weights [B] in row-major order (row r holds examples r*K ..
r*K + K - 1), so a data-sharded batch keeps every example with its row. The
model turns segment_ids into a block-diagonal attention mask and
per-example positions.
"""

import numpy as np

from research.data import samplers
from research.data.errors import DataError


EVAL_ORDERS = ("split", "length")


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


def auto_buckets(lengths, max_length, num_buckets=8, multiple=4, fit=True):
  """Chooses the buckets that minimise padding for these example lengths.

  Exact dynamic programme over candidate lengths (multiples of `multiple`,
  and the last bucket): the padded total when every example is padded to its
  bucket is minimised for at most `num_buckets` buckets, the last included.
  With `fit` the last bucket is the longest length rounded up to `multiple`
  (at most max_length): every length is known, and a bucket past them all
  only pads (a few-shot split's pairs at 256 when the longest is 150).
  Without it, max_length, for lengths that are a sample (a longer one may
  come later).

  Args:
    lengths: example lengths (tokens, special tokens included).
    max_length: the truncation length; always the last bucket.
    num_buckets: the most buckets (compilations) to allow.
    multiple: candidate bucket lengths are multiples of this.
    fit: end at the longest length (rounded up), not at max_length.

  Returns:
    A sorted tuple of bucket lengths, the last one max_length, or with `fit`
    the longest length rounded up to `multiple` and at most max_length.
  """
  lengths = np.minimum(np.asarray(lengths, np.int64), max_length)
  top = max_length
  if fit and lengths.size:
    top = min(max_length, -(-int(lengths.max()) // multiple) * multiple)
  cands = np.unique(np.append(np.arange(multiple, top, multiple),
                              top)).astype(np.float64)
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
  return make_buckets(out, top)


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
  """Builds training and evaluation batches from a featurised split.

  Training (`batch_at`, `iterate`): the sampler plans each epoch's batches
  (`research.data.samplers`; by default `bucketed`: random batches grouped
  by length bucket, see its docstring), and each batch is padded to the
  smallest bucket that fits its longest example. With shuffle=False the
  batches follow the split's order.

  Packed training (`examples_per_row` > 1): the sampler's batches (by
  default `shuffle`: random, no length grouping, packing absorbs the length
  spread) are split into rows of equal count by `pack_rows`, and each batch
  is padded to the smallest bucket that fits its longest row.

  Evaluation (`eval_batches`): every example exactly once, in order; the last
  batch is filled with padding rows (weights 0).

  Args:
    split: a `TokenizedSplit`.
    batch_size: the global batch size (all hosts together); a Poisson
      sampler's expected size.
    buckets: padded lengths (see `make_buckets`); empty: `auto_buckets` of
      this split's lengths (shuffle=False: of its in-order batches' longest
      examples, what each batch is padded to).
    seed: the data-order seed.
    shuffle: False: the split's order (sampler "sequential").
    process_index: this host's index.
    process_count: the number of hosts; must divide batch_size (with
      packing: the rows).
    examples_per_row: K > 1 packs training batches (see the module
      docstring): `buckets` are then row lengths, at most K * max_length.
      Evaluation batches are never packed.
    sampler: a `research.data.samplers` module name; "auto": `bucketed`, or
      `shuffle` when packing.
    sampler_options: the sampler's options (`config.data.sampler_options`).
    num_buckets: the most buckets `auto_buckets` may choose (empty
      `buckets` only).
    multiple: `auto_buckets`' widths are multiples of this.
    eval_order: `eval_batches`' order: "split" (the split's), or "length"
      (shortest first, for an evaluator to which order does not matter:
      each batch pads to about its own width); with shuffle=False,
      automatic buckets fit that order's batches.
  """

  def __init__(self, split, batch_size, buckets, seed=0, shuffle=True,
               process_index=0, process_count=1, examples_per_row=1,
               sampler="auto", sampler_options=None, num_buckets=8,
               multiple=4, eval_order="split"):
    per_row = int(examples_per_row)
    if batch_size <= 0:
      raise DataError(f"batch size {batch_size} must be positive")
    if per_row < 1 or batch_size % per_row:
      raise DataError(f"data.examples_per_row={examples_per_row} must be "
                      f">= 1 and divide the batch size {batch_size}")
    if sampler == "auto":
      sampler = "shuffle" if per_row > 1 else "bucketed"
    if not shuffle:
      sampler = "sequential"
    self.split = split
    self.lengths = np.diff(split.offsets)
    self.sampler = samplers.create(sampler, self.lengths, batch_size, seed,
                                   sampler_options)
    if per_row > 1 and self.sampler.batch_size != batch_size:
      raise DataError(f"data.sampler={sampler!r} makes batches of varying "
                      "size, which packed rows (data.examples_per_row > 1) "
                      "cannot hold; set data.examples_per_row=1")
    batch_size = self.sampler.batch_size  # the fixed shape (Poisson's max)
    units = batch_size // per_row  # rows of a batch; hosts split them
    if units % process_count:
      raise DataError(f"batch size {batch_size} must be positive and its "
                      + ("rows" if per_row > 1 else "examples") +
                      f" divisible by the number of hosts ({process_count})")
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index {process_index} is not in "
                      f"[0, {process_count})")
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.process_index = process_index
    self.process_count = process_count
    self.examples_per_row = per_row
    if eval_order not in EVAL_ORDERS:
      raise DataError(f"eval_order={eval_order!r}; valid: "
                      f"{', '.join(EVAL_ORDERS)}")
    self.eval_order = eval_order
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
      self.buckets = auto_buckets(widest, longest, num_buckets, multiple,
                                  fit=False)
    elif not shuffle and len(self.lengths):
      # In order, a batch is padded to its longest example: fit the widths
      # to those maxima, not to the example lengths.
      n, size = len(self.lengths), self.batch_size
      widest = np.maximum.reduceat(self.lengths[self._eval_indices()],
                                   np.arange(0, n, size))
      self.buckets = auto_buckets(widest, split.max_length, num_buckets,
                                  multiple)
    else:
      self.buckets = auto_buckets(self.lengths, split.max_length, num_buckets,
                                  multiple)
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
    steps = self.sampler.steps_per_epoch
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

  def _longest(self, order):
    """The longest real example of each row of `order` (-1: padding)."""
    return np.where(order >= 0, self.lengths[np.maximum(order, 0)], 0).max(
        axis=-1)

  def _pack(self, epoch):
    """The sampler's batches packed into rows: (order [steps, B], row lengths)."""
    order = self.sampler.epoch(epoch, None)
    slot, row_lengths = pack_rows(self.lengths[order],
                                  self.batch_size // self.examples_per_row)
    return np.take_along_axis(order, slot, axis=1), row_lengths

  def _plan(self, epoch):
    """Returns (example indices [steps, B], -1 = padding; widths [steps])."""
    if self._plan_cache is not None and self._plan_cache[0] == epoch:
      return self._plan_cache[1]
    if self.packed:
      order, row_lengths = self._pack(epoch)
      widths = self._bucket(row_lengths.max(axis=1))
    else:
      order = self.sampler.epoch(epoch, self.buckets)
      widths = self._bucket(self._longest(order))
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
    real = np.where(order >= 0, self.lengths[np.maximum(order, 0)], 0)
    return float(real.sum() / (widths.sum() * rows))

  def _eval_indices(self):
    """The examples in `eval_order`."""
    if self.eval_order == "length":
      return np.argsort(self.lengths, kind="stable")
    return np.arange(len(self.lengths))

  def eval_batches(self):
    """Yields this host's part of each evaluation batch.

    The global batches cover every example exactly once, in `eval_order`
    (the split's, or shortest first); padding rows (weights 0) fill the
    last one.
    """
    n, size = len(self.lengths), self.batch_size
    lo = self.process_index * self.local_batch_size
    order = self._eval_indices()
    for start in range(0, n, size):
      global_idx = np.full(size, -1, np.int64)
      chunk = order[start:start + size]
      global_idx[:len(chunk)] = chunk
      width = self._bucket(self.lengths[global_idx[global_idx >= 0]].max())
      yield self._assemble(global_idx[lo:lo + self.local_batch_size], width)

  def _assemble(self, idx, width):
    """Pads examples `idx` (-1: a padding row) to [len(idx), width]."""
    split = self.split
    real = idx >= 0
    safe = np.where(real, idx, 0)
    starts = split.offsets[safe]
    lens = np.where(real, self.lengths[safe], 0)
    pos = np.arange(width)
    mask = pos[None, :] < lens[:, None]
    gather = np.where(mask, starts[:, None] + pos[None, :], 0)
    out = {}
    for f in split.fields:
      values = split.arrays[f.name]
      if f.per_token:
        out[f.name] = np.where(mask, values[gather], f.pad).astype(f.dtype)
      else:
        rows = real.reshape((-1,) + (1,) * (values.ndim - 1))
        out[f.name] = np.where(rows, values[safe], f.pad).astype(f.dtype)
    attention_mask = mask.astype(np.int32)
    # A padding row attends to one token: a fully masked row can give NaN
    # logits, and NaN * weight 0 is still NaN in a weighted sum.
    attention_mask[~real, 0] = 1
    out["attention_mask"] = attention_mask
    out["weights"] = real.astype(np.float32)
    return out

  def _assemble_packed(self, idx, width):
    """Packs examples `idx` (row-major, K per row) into [len(idx) / K, width]."""
    split = self.split
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
    gather = np.where(real, split.offsets[example] + within, 0)
    out = {}
    for f in split.fields:
      values = split.arrays[f.name]
      out[f.name] = (np.where(real, values[gather], f.pad) if f.per_token
                     else values[idx]).astype(f.dtype)
    out["attention_mask"] = real.astype(np.int32)
    out["segment_ids"] = segment.astype(np.int32)
    out["example_starts"] = starts.astype(np.int32)
    out["weights"] = np.ones(len(idx), np.float32)
    return out


class EpochBatcher(Batcher):
  """Training batches of a set that changes every epoch (the `augment` method).

  Epoch e's split is `split_at(e)` (epoch 0's is `split`), with as many
  examples as `split`, so the steps per epoch never change. A `Batcher` of
  that split plans and assembles the epoch: its sampler orders that epoch's
  lengths, as a function of (seed, epoch), and pads to the buckets chosen
  for epoch 0, so every epoch has the same batch shapes and `batch_at(step)`
  is the same after any restart, as long as `split_at` is a function of the
  epoch. An epoch's split is made when first planned (`batch_at`,
  `planned_widths`) and kept until `iterate` has moved past it.

  Args:
    split: epoch 0's split.
    batch_size, buckets, **kwargs: as `Batcher`'s.
    split_at: `epoch -> TokenizedSplit`, for epochs >= 1.
  """

  def __init__(self, split, batch_size, buckets, *, split_at, **kwargs):
    super().__init__(split, batch_size, buckets, **kwargs)
    self._split_at = split_at
    self._args = (batch_size, kwargs)
    self._epochs = {}  # epoch -> its Batcher

  def at_epoch(self, epoch):
    """The `Batcher` of epoch `epoch` (made on first use)."""
    if epoch not in self._epochs:
      split = self.split if epoch == 0 else self._split_at(epoch)
      if len(split) != len(self.split):
        raise DataError(f"epoch {epoch}'s training set has {len(split)} "
                        f"examples; epoch 0's has {len(self.split)}: the "
                        "steps per epoch must not change")
      batch_size, kwargs = self._args
      self._epochs[epoch] = Batcher(split, batch_size, self.buckets, **kwargs)
    return self._epochs[epoch]

  def _plan(self, epoch):
    return self.at_epoch(epoch)._plan(epoch)  # pylint: disable=protected-access

  def batch_at(self, step):
    return self.at_epoch(int(step) // self.steps_per_epoch).batch_at(step)

  def iterate(self, start_step=0, num_steps=None):
    for step, batch in enumerate(super().iterate(start_step, num_steps),
                                 start_step):
      # Training never goes back: the epochs before this one are dropped.
      for old in [e for e in self._epochs if e < step // self.steps_per_epoch]:
        del self._epochs[old]
      yield batch

  def padding_efficiency(self, epoch=0):
    return self.at_epoch(epoch).padding_efficiency(epoch)
