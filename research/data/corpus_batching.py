"""Training and evaluation batches from a pre-training `Corpus` (grain).

The masked-LM task (`research/tasks/masked_lm.py`) reads a corpus instead of
labelled rows: `CorpusSplit` stands where a `TokenizedSplit` stands, and
`CorpusBatcher` where a `data.Batcher` does, with the same interface to the
training loop, the benchmark and the evaluators (`batch_at`, `iterate`,
`planned_widths`, `eval_batches`, `steps_per_epoch`, ...). Rows are already
fixed-length ([CLS] ... [SEP] [PAD]...), so there is one bucket: the row
length.

Position: batch `s` of training is `dataset[s]` of the corpus's grain
`MapDataset` (a function of the seed and `s` alone). The loop reads the
batches through grain's checkpointable iterator; `state_at(step)` is the
iterator's state after the batch of `step` (recorded as it was produced, so
the batches prefetched ahead do not shift it) and goes into the orbax
checkpoint beside the model (`research.train`). A resumed run restores it
(`restore_state`) and checks that the iterator gives the step's batch.

Next-sentence prediction (`next_sentence=True`, BERT's second objective):
each row is cut at a random point into segments A and B; with probability
1/2 B is the rest of the row (the text that follows A: label 0), otherwise
text from a random place in another row of the batch (label 1). The draws are
a function of (seed, step, process), so resume stays exact. Rows of a "doc"
corpus hold one document each, as BERT's pairs do; with "full" packing an
"is next" pair may cross a document boundary.
"""

from __future__ import annotations

import collections

import numpy as np

from research.data.errors import DataError

# Salts of the pair-sampling streams: training steps and evaluation batches.
_TRAIN_PAIRS, _EVAL_PAIRS = 1, 2
_KEEP_STATES = 64  # iterator states kept for `state_at` (prefetch is ~2)


class CorpusSplit:
  """A built corpus as an evaluation or training split.

  Args:
    name: the split's name ("train", "validation").
    corpus: a `research.data.corpus.Corpus`.
    max_rows: use only the first rows (evaluation); None: all.
  """
  has_labels = True  # the masks make the labels
  label_names = ()

  def __init__(self, name, corpus, max_rows=None):
    self.name = name
    self.corpus = corpus
    self.max_rows = max_rows or None
    self.max_length = corpus.info.seq_len
    self.where = "; ".join(corpus.info.sources)

  def __len__(self):
    return min(len(self.corpus), self.max_rows or len(self.corpus))


def sentence_pairs(ids, rng, *, cls_id, sep_id, pad_id):
  """Turns packed rows into NSP segment pairs (see the module docstring).

  Args:
    ids: int32 [B, L] rows `[CLS] content [SEP] [PAD]...`.
    rng: a numpy Generator (a function of seed and step).
    cls_id, sep_id, pad_id: the special tokens.

  Returns:
    (input_ids [B, L], token_type_ids [B, L], next_sentence_label [B]:
    0 when B follows A, 1 when B is random).
  """
  rows, width = ids.shape
  content = [row[1:int((row != pad_id).sum()) - 1] for row in ids]
  out = np.full_like(ids, pad_id)
  types = np.zeros_like(ids)
  labels = np.zeros(rows, np.int32)
  for i, text in enumerate(content):
    n = len(text)
    if n < 2 or rows < 2:  # nothing to split: keep the row, "is next"
      out[i, :n + 2] = ids[i, :n + 2]
      continue
    cut = int(rng.integers(1, n))
    a, b = text[:cut], text[cut:]
    if rng.random() < 0.5:
      labels[i] = 1
      other = content[(i + 1 + int(rng.integers(0, rows - 1))) % rows]
      if len(other) == 0:
        other = text
      start = int(rng.integers(0, len(other)))
      b = other[start:start + len(b)]
    # [CLS] A [SEP] B [SEP] fits in L when A + B <= L - 3: cut B's end, or
    # A's start when B is one token (the pair stays contiguous text).
    over = len(a) + len(b) - (width - 3)
    if over > 0:
      if len(b) > over:
        b = b[:len(b) - over]
      else:
        a = a[over:]
    row = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]])
    out[i, :len(row)] = row
    types[i, len(a) + 2:len(row)] = 1
  return out, types, labels


class CorpusBatcher:
  """Batches of a `CorpusSplit` with the `data.Batcher` interface.

  Args:
    split: a `CorpusSplit`.
    batch_size: the global batch (all processes together).
    seed: the shuffle seed (and the NSP draws').
    shuffle: False: evaluation (every row once, in order).
    process_index, process_count: this process and the number of them;
      each reads its rows of every global batch (`Corpus.dataset`).
    next_sentence: make NSP segment pairs (`sentence_pairs`).
    read_options: `grain.ReadOptions` for the training iterator.
  """
  packed = False
  examples_per_row = 1

  def __init__(self, split, batch_size, *, seed=0, shuffle=True,
               process_index=0, process_count=1, next_sentence=False,
               read_options=None):
    self.split = split
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.process_index, self.process_count = process_index, process_count
    self.next_sentence = next_sentence
    self.read_options = read_options
    self.buckets = (split.max_length,)
    self.info = split.corpus.info
    hosts = dict(process_index=process_index, process_count=process_count)
    if shuffle:
      self._train = split.corpus.dataset(batch_size, seed=seed, **hosts)
    self._eval_hosts = hosts
    self._states = collections.OrderedDict()
    self._restored = None

  @property
  def local_batch_size(self):
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self):
    """Full batches per pass over the corpus (`Corpus.dataset` checked >= 1)."""
    return len(self.split) // self.batch_size

  @property
  def num_eval_batches(self):
    return -(-len(self.split) // self.batch_size)

  def _finish(self, batch, stream, index):
    """Adds token types, weights (and NSP pairs) to a grain batch."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.sum(axis=1) > 0
    out = {"input_ids": ids, "token_type_ids": np.zeros_like(ids)}
    if self.next_sentence:
      rng = np.random.default_rng([self.seed, stream, index,
                                   self.process_index])
      ids, types, labels = sentence_pairs(
          ids, rng, cls_id=self.info.cls_id, sep_id=self.info.sep_id,
          pad_id=self.info.pad_id)
      mask = (ids != self.info.pad_id).astype(np.int32)
      out = {"input_ids": ids, "token_type_ids": types,
             "next_sentence_label": labels}
    mask = mask.copy()
    # A padding row attends to one token (no NaN from an all-masked row).
    mask[~real, 0] = 1
    out.update(attention_mask=mask, weights=real.astype(np.float32))
    return out

  # --- Training --------------------------------------------------------------

  def batch_at(self, step):
    """This process's part of global training batch `step`."""
    return self._finish(self._train[int(step)], _TRAIN_PAIRS, int(step))

  def restore_state(self, state):
    """The iterator state of a checkpoint (`state_at`): `iterate` resumes it."""
    self._restored = state

  def state_at(self, step):
    """grain's iterator state after the batch of micro-step `step` - 1.

    Raises:
      KeyError: `step` is not among the batches produced lately.
    """
    return self._states[int(step)]

  def iterate(self, start_step=0, num_steps=None):
    """Yields training batches from `start_step` through grain's iterator.

    From a restored state (`restore_state`) the iterator continues where the
    checkpoint left it; that it gives batch `start_step` is checked.

    Raises:
      DataError: a restored position that is not `start_step`'s.
    """
    it = iter(self._train.to_iter_dataset(self.read_options))
    state = self._restored
    if state is None and start_step:
      # No saved position (a benchmark, an older checkpoint): the position
      # is the step.
      state = dict(it.get_state(), next_index=int(start_step))
    if state is not None:
      it.set_state(state)
    self._states.clear()
    self._states[int(start_step)] = it.get_state()
    step = int(start_step)
    while num_steps is None or step < start_step + num_steps:
      raw = next(it)
      if step == start_step and state is not None and not np.array_equal(
          raw["input_ids"], self._train[step]["input_ids"]):
        raise DataError(
            f"{self.split.where}: the checkpoint's data position {state} is "
            f"not step {step}'s; was the corpus rebuilt or the batch size "
            "changed?")
      self._states[step + 1] = it.get_state()
      while len(self._states) > _KEEP_STATES:
        self._states.popitem(last=False)
      yield self._finish(raw, _TRAIN_PAIRS, step)
      step += 1

  def __iter__(self):
    return self.iterate(0)

  def planned_widths(self, start_step, num_steps):
    """{width: first step}: one width, the row length."""
    del num_steps
    return {self.split.max_length: int(start_step)}

  def padding_efficiency(self, epoch=0, batches=8):
    """Real / padded tokens of the first training batches of an epoch."""
    first = epoch * self.steps_per_epoch
    masks = [self.batch_at(first + i)["attention_mask"]
             for i in range(min(batches, self.steps_per_epoch))]
    return float(np.mean(masks))

  # --- Evaluation ------------------------------------------------------------

  def eval_batches(self):
    """Every row once, in order; the last batch padded with weight-0 rows."""
    ds = self.split.corpus.dataset(
        self.batch_size, shuffle=False, num_epochs=1,
        max_rows=self.split.max_rows, **self._eval_hosts)
    for index in range(len(ds)):
      yield self._finish(ds[index], _EVAL_PAIRS, index)
