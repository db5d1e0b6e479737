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
each row is cut into segments A and B at a sentence boundary, chosen
uniformly among the row's boundaries; with probability 1/2 B is the rest of
the row (the sentences that follow A: label 0, IsNext), otherwise text of
another row of the batch from one of its sentence starts (label 1, NotNext).
A row without a boundary is cut at a random token, and a NotNext B from a
row without one starts at a random token. The draws are a function of
(seed, step, process), so resume stays exact. Rows of a "doc" corpus hold
one document each, as BERT's pairs do; with "full" packing an IsNext pair
may cross a document boundary.

Sentence boundaries are read from the token ids (`sentence_table`, built
once from the tokenizer's vocabulary), not recorded when the corpus is
built: existing corpora need no rebuild, the rows stay one array, and the
rule works for WordPiece (word pieces after "##") and byte-level BPE or
SentencePiece (a word start carries "Ġ" / "▁"). A sentence ends after a
token made of ".", "!", "?" (".", "!", "...", "?!", "Ġ.") when the next
token starts a word with a letter, and the token before it is not a single
letter ("u.s.", "e.g.", initials) nor a title ("dr.", "mr."). Decimals
("3.5"), WikiText's "@.@" and a quote after the period are not boundaries
(the next token starts with no letter, or is a piece of a word). It is a
heuristic, as any sentence splitter is; where it finds nothing the row gets
the random cut (on WikiText rows of 128 tokens, 62% of the rows hold a
boundary; the rest are mostly headings). BERT's own pipeline splits the text
into sentences before tokenising (input one sentence per line); this rule
needs no such input.
"""

from __future__ import annotations

import collections

import numpy as np

from research.data.errors import DataError

# Salts of the pair-sampling streams: training steps and evaluation batches.
_TRAIN_PAIRS, _EVAL_PAIRS = 1, 2
_KEEP_STATES = 64  # iterator states kept for `state_at` (prefetch is ~2)
# `sentence_table` flags: ends a sentence, starts one, no end after it.
END, START, NO_END = 1, 2, 4
_MARKS = "\u0120\u2581"  # byte-level BPE's "Ġ", SentencePiece's "▁"
_ENDS = frozenset(".!?")
_TITLES = frozenset(("mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs"))


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


def sentence_table(tokenizer):
  """Per-token sentence flags of a vocabulary (see the module docstring).

  Args:
    tokenizer: a Hugging Face tokenizer (WordPiece, BPE or SentencePiece).

  Returns:
    uint8 [vocab size]: `END` (".", "!", "?" and runs of them), `START` (a
    word that starts with a letter), `NO_END` (a single letter or a title:
    a period after it ends no sentence); 0 for special tokens.
  """
  vocab = tokenizer.get_vocab()
  table = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), np.uint8)
  # Byte-level BPE and SentencePiece mark a word's start; WordPiece marks
  # the pieces that continue a word.
  marked = sum(t[:1] in _MARKS for t in vocab) > len(vocab) // 10
  special = set(tokenizer.all_special_ids)
  for token, i in vocab.items():
    if i in special:
      continue
    if marked:
      word_start, text = token[:1] in _MARKS, token.lstrip(_MARKS)
    else:
      word_start = not token.startswith("##")
      text = token.removeprefix("##")
    if text and set(text) <= _ENDS:
      table[i] |= END
    if word_start and text[:1].isalpha():
      table[i] |= START
    if (len(text) == 1 and text.isalpha()) or text.lower() in _TITLES:
      table[i] |= NO_END
  return table


def sentence_starts(text, table):
  """Where sentences start in a row's content, [int]: 1 <= k < len(text).

  Args:
    text: int [n] token ids (a row without [CLS], its [SEP] and padding).
    table: `sentence_table` of the vocabulary.
  """
  flags = table[text]
  ends = (flags[:-1] & END) > 0
  starts = (flags[1:] & START) > 0
  after_word = np.ones_like(ends)
  after_word[1:] = (flags[:-2] & NO_END) == 0
  return np.flatnonzero(ends & starts & after_word) + 1


def sentence_pairs(ids, rng, *, cls_id, sep_id, pad_id, table=None):
  """Turns packed rows into NSP segment pairs (see the module docstring).

  Args:
    ids: int32 [B, L] rows `[CLS] content [SEP] [PAD]...`.
    rng: a numpy Generator (a function of seed and step).
    cls_id, sep_id, pad_id: the special tokens.
    table: `sentence_table` of the vocabulary: cuts at sentence boundaries;
      None: every cut at a random token.

  Returns:
    (input_ids [B, L], token_type_ids [B, L], next_sentence_label [B]:
    0 when B follows A, 1 when B is random).
  """
  rows, width = ids.shape
  content = [row[1:int((row != pad_id).sum()) - 1] for row in ids]
  none = np.zeros(0, np.int64)
  starts = [none if table is None else sentence_starts(t, table)
            for t in content]
  out = np.full_like(ids, pad_id)
  types = np.zeros_like(ids)
  labels = np.zeros(rows, np.int32)
  for i, text in enumerate(content):
    n = len(text)
    if n < 2 or rows < 2:  # nothing to split: keep the row, "is next"
      out[i, :n + 2] = ids[i, :n + 2]
      continue
    cut = _pick(rng, starts[i], 1, n)
    a, b = text[:cut], text[cut:]
    if rng.random() < 0.5:
      labels[i] = 1
      j = (i + 1 + int(rng.integers(0, rows - 1))) % rows
      if len(content[j]) == 0:
        j = i
      start = _pick(rng, starts[j], 0, len(content[j]))
      b = content[j][start:start + len(b)]
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


def _pick(rng, choices, low, high):
  """One of `choices` (sentence starts), or a token in [low, high) if none."""
  if len(choices):
    return int(choices[rng.integers(0, len(choices))])
  return int(rng.integers(low, high))


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
    sentence_table: the vocabulary's `sentence_table` (NSP cuts at sentence
      boundaries); None: random cuts.
    read_options: `grain.ReadOptions` for the training iterator.
  """
  packed = False
  examples_per_row = 1

  def __init__(self, split, batch_size, *, seed=0, shuffle=True,
               process_index=0, process_count=1, next_sentence=False,
               sentence_table=None, read_options=None):
    self.split = split
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.process_index, self.process_count = process_index, process_count
    self.next_sentence = next_sentence
    self.sentence_table = sentence_table
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
          pad_id=self.info.pad_id, table=self.sentence_table)
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
