"""Text augmentation of a training split, and character noise for robustness evals.

Both edit a tokenised sequence-level split (`TokenizedSplit` with input_ids,
token_type_ids and one label per example) word by word, in token space: a
word is a token and its WordPiece continuations (`##...`); special tokens
([CLS], [SEP]) stay where they are, and each text of a pair is edited on its
own. No text is re-read and nothing leaves `data.max_length`.

Training (`augment(...)`, the `augment` method: `config.methods =
("augment",)`, options in `config.method_options.augment`, see
research/methods/augment.py): each example gets `copies`
augmented copies (the split grows to (1 + copies) x N); copy c of example i
applies one operation of `ops`, drawn as below (`regenerate`), with `rate`:

  swap        EDA random swap: round(rate x words) swaps of two words;
  delete      EDA random deletion: each word dropped with probability rate;
  insert      EDA random insertion, without a thesaurus (none offline): a
              copy of a random word of the text, at a random place,
              round(rate x words) times;
  contextual  Kobayashi (2018) / Wu et al. (2019): round(rate x words)
              single-token words replaced by the top prediction of a
              masked-LM (`mlm_model`) that differs from the original.

When the copies are made (`regenerate`):

  epoch  (default) new copies every epoch: epoch e's are drawn from
         `(seed, e, c, i)`, so a model meets each example under a fresh
         edit each epoch instead of memorising one, and a run resumed in
         epoch e (after any restart) rebuilds exactly that epoch's copies.
  once   Wei & Zou's (2019) EDA: one set, from `(seed, c, i)`, made before
         training and used by every epoch (the behaviour before issue 21).

Per-epoch copies are made lazily: `from_options` makes epoch 0's (the run
needs its size and lengths before training: the steps per epoch, the length
buckets) and returns `split_at(epoch)`, which `data.EpochBatcher` calls when
an epoch is first planned and drops once training has moved past it. The
set keeps its size, (1 + copies) x N, every epoch; each epoch's order (its
length buckets) is planned from that epoch's lengths and padded to the
buckets chosen for epoch 0, so every epoch has the same batch shapes
(compilations). Memory holds the current epoch's set, and more only when
`config.precompile` plans ahead for batch widths not yet met (with
configured buckets that no batch fills, every epoch of the run, made before
step 1 and not made twice). Making a set is a pass over the training split
in Python once per epoch (swap / delete / insert: about 30 us per copy of a
16-token sentence, 0.01 s for the quickstart's 320 with one copy, on 2
shared CPU cores); `contextual` also runs the masked LM over its copies
once per epoch instead of once per run, the slower part on a large set (its
jitted forward is reused).

`typos(...)` (evaluation): each word of letters is, with probability `rate`,
given one typo: two adjacent characters swapped, one dropped or one random
letter inserted; then tokenised again.
"""

from __future__ import annotations

import logging

import numpy as np

from research.configs.plugins import ConfigError
from research.data.splits import TokenizedSplit

log = logging.getLogger(__name__)

OPS = ("swap", "delete", "insert", "contextual")
REGENERATE = ("epoch", "once")
SEQUENCE_FIELDS = {"input_ids", "token_type_ids", "labels"}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def check(a, where="config.method_options.augment") -> None:
  """Raises ConfigError for bad augmentation options `a` (attribute access)."""
  for op in a.ops:
    if op not in OPS:
      raise ConfigError(f"{where}.ops has {op!r}; valid: {', '.join(OPS)}")
  if a.copies < 1:
    raise ConfigError(f"{where}.copies={a.copies} must be >= 1")
  if not a.ops:
    raise ConfigError(f"{where}.ops is empty: list any of {', '.join(OPS)}")
  if a.regenerate not in REGENERATE:
    raise ConfigError(
        f"{where}.regenerate={a.regenerate!r}; valid: epoch (new "
        "copies every epoch, from (seed, epoch)), once (one set before "
        "training: Wei & Zou's EDA)")
  if not 0 < a.rate <= 1:
    raise ConfigError(f"{where}.rate={a.rate} must be in (0, 1]")
  if "contextual" in a.ops and not a.mlm_model:
    raise ConfigError(
        f"{where}.ops has 'contextual': set {where}.mlm_model "
        "to a checkpoint with its masked-LM head and the training model's "
        "vocabulary (e.g. a BertForMaskedLM directory); the packaged "
        "all-minilm-l6-v2 has no MLM head")


class Words:
  """Token ids <-> words of a tokenizer's vocabulary."""

  def __init__(self, tokenizer, special):
    self.tokenizer = tokenizer
    self.special = np.zeros(len(tokenizer), bool)
    self.special[list(special)] = True
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # WordPiece continuations; other vocabularies: every token is a word.
    self.continues = np.array([t.startswith("##") for t in tokens])

  def split(self, ids, types):
    """One example -> items: (special id, type) or (list of words, type)."""
    items, words = [], []
    for tok, typ in zip(ids.tolist(), types.tolist()):
      if self.special[tok]:
        if words:
          items.append((words, text_type))
          words = []
        items.append((tok, typ))
      elif words and self.continues[tok]:
        words[-1].append(tok)
      else:
        words.append([tok])
        text_type = typ
    if words:
      items.append((words, text_type))
    return items

  @staticmethod
  def join(items):
    """Items -> (input_ids, token_type_ids) arrays."""
    ids, types = [], []
    for item, typ in items:
      toks = [item] if isinstance(item, int) else [t for w in item for t in w]
      ids += toks
      types += [typ] * len(toks)
    return np.asarray(ids, np.int32), np.asarray(types, np.int32)

  def text(self, word) -> str:
    """A word's characters (WordPiece `##` removed)."""
    return "".join(t[2:] if t.startswith("##") else t
                   for t in self.tokenizer.convert_ids_to_tokens(word))

  def encode(self, text) -> list:
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _count(rate, n) -> int:
  return max(1, int(round(rate * n))) if n else 0


def swap(words, rng, rate, budget):
  del budget
  words = list(words)
  for _ in range(_count(rate, len(words)) if len(words) > 1 else 0):
    i, j = rng.choice(len(words), 2, replace=False)
    words[i], words[j] = words[j], words[i]
  return words


def delete(words, rng, rate, budget):
  del budget
  if len(words) < 2:
    return list(words)
  keep = rng.random(len(words)) >= rate
  if not keep.any():
    keep[rng.integers(len(words))] = True
  return [w for w, k in zip(words, keep) if k]


def insert(words, rng, rate, budget):
  words = list(words)
  for _ in range(_count(rate, len(words))):
    word = words[rng.integers(len(words))]
    if len(word) > budget:
      break
    words.insert(int(rng.integers(len(words) + 1)), word)
    budget -= len(word)
  return words


def _edit(items, rng, fn, budget):
  """Applies `fn(words, rng, rate, budget)` to each text of an example."""
  out = []
  for item, typ in items:
    if isinstance(item, int):
      out.append((item, typ))
      continue
    new = fn(item, rng, budget)
    budget -= sum(map(len, new)) - sum(map(len, item))
    out.append((new, typ))
  return out


def _rebuild(split, examples, repeat, name=None):
  """A sequence-level split of `examples` [(ids, types)]; per-example
  arrays repeated `repeat` times (the copies follow the originals)."""
  lengths = np.array([len(ids) for ids, _ in examples], np.int64)
  offsets = np.zeros(len(examples) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  return TokenizedSplit.sequence(
      name=name or split.name, where=split.where,
      input_ids=np.concatenate([ids for ids, _ in examples]),
      token_type_ids=np.concatenate([t for _, t in examples]).astype(
          split.token_type_ids.dtype),
      offsets=offsets, labels=np.tile(split.labels, repeat),
      rows=np.tile(split.rows, repeat), max_length=split.max_length,
      has_labels=split.has_labels,
      pad_id=next(f.pad for f in split.fields if f.name == "input_ids"),
      label_names=split.label_names)


def _check_fields(split, what):
  names = {f.name for f in split.fields}
  if names != SEQUENCE_FIELDS:
    raise ConfigError(
        f"{what} edits sequence-level splits (fields input_ids, "
        f"token_type_ids, labels); split {split.name!r} has "
        f"{', '.join(sorted(names))}")


def _examples(split):
  for i in range(len(split)):
    lo, hi = split.offsets[i], split.offsets[i + 1]
    yield split.input_ids[lo:hi], split.token_type_ids[lo:hi]


def augment(split, words, *, ops, copies, rate, seed, epoch=None, mlm=None):
  """The split with `copies` augmented copies of every example appended.

  Args:
    split: a sequence-level `TokenizedSplit` (the training split).
    words: the tokenizer's `Words`.
    ops: operations of `OPS`; copy c of example i draws one from
      `(seed, c, i)`, or `(seed, epoch, c, i)` for an epoch's copies.
    copies: augmented copies per example.
    rate: the share of each text's words an operation changes.
    seed: with (copy, example), the generator of every draw.
    epoch: None: the copies made once (regenerate="once"); an epoch: that
      epoch's copies (regenerate="epoch").
    mlm: for "contextual": `predict(ids [n, L], types, attention, positions
      [n, L] bool) -> ids [n, L]` (see `MaskedLM`).

  Returns:
    A `TokenizedSplit` of (1 + copies) x N examples: the originals, then
    copy 1 of each, ...
  """
  _check_fields(split, "the augment method")
  fns = {"swap": swap, "delete": delete, "insert": insert}
  originals = list(_examples(split))
  out = list(originals)
  contextual = []  # (index in out, items, chosen word positions)
  for c in range(1, copies + 1):
    for i, (ids, types) in enumerate(originals):
      rng = np.random.default_rng(
          [seed, c, i] if epoch is None else [seed, epoch, c, i])
      op = ops[rng.integers(len(ops))]
      items = words.split(ids, types)
      budget = split.max_length - len(ids)
      if op == "contextual":
        contextual.append((len(out), items, rng))
        out.append(None)
        continue
      fn = fns[op]
      out.append(Words.join(_edit(items, rng, lambda w, r, b, fn=fn: fn(
          w, r, rate, b), budget)))
  if contextual:
    _contextual(out, contextual, words, rate, mlm)
  return _rebuild(split, out, copies + 1)


def _contextual(out, jobs, words, rate, mlm):
  """Fills `out` at each job's index with its MLM-replaced example."""
  masked = []
  for index, items, rng in jobs:
    ids, types = Words.join(items)
    # Single-token words (whole words for the MLM to guess), by position.
    pos, k = [], 0
    for item, _ in items:
      if isinstance(item, int):
        k += 1
        continue
      for w in item:
        if len(w) == 1:
          pos.append(k)
        k += len(w)
    chosen = (rng.choice(pos, min(len(pos), _count(rate, len(pos))),
                         replace=False) if pos else np.zeros(0, int))
    where = np.zeros(len(ids), bool)
    where[chosen] = True
    masked.append((index, ids, types, where))
  new = mlm(masked)
  for (index, _, types, _), ids in zip(masked, new):
    out[index] = (ids, types)


def typos(split, words, *, rate, seed):
  """The split with character typos (see the module docstring), same order.

  Example i's draws come from `(seed, i)`: every evaluation sees the same
  noise. A typo that would push an example past `max_length` is skipped.
  """
  _check_fields(split, "the typo evaluation")
  out = []
  for i, (ids, types) in enumerate(_examples(split)):
    rng = np.random.default_rng([seed, i])
    budget = split.max_length - len(ids)

    def noisy(ws, rng, budget):
      new = []
      for w in ws:
        text = words.text(w)
        if text.isalpha() and rng.random() < rate:
          text = _typo(text, rng)
          toks = words.encode(text)
          if toks and len(toks) - len(w) <= budget:
            budget -= len(toks) - len(w)
            w = toks
        new.append(w)
      return new

    out.append(Words.join(_edit(words.split(ids, types), rng, noisy, budget)))
  return _rebuild(split, out, 1)


def _typo(text, rng) -> str:
  """One character swapped with the next, dropped, or a letter inserted."""
  kind = rng.integers(3) if len(text) > 1 else 2
  i = int(rng.integers(len(text) - (kind == 0)))
  if kind == 0:
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]
  if kind == 1:
    return text[:i] + text[i + 1:]
  return text[:i] + _LETTERS[rng.integers(26)] + text[i:]


class MaskedLM:
  """Top predictions of a masked-LM checkpoint for the contextual operation.

  Args:
    model_name: a checkpoint with its MLM head (`hf.resolve` names), whose
      vocabulary is the training tokenizer's.
    words: the training tokenizer's `Words` (the mask token, special ids).
    batch_size: examples per forward pass.
  """

  def __init__(self, model_name, words, batch_size=64):
    from research.models import heads, hf  # pylint: disable=import-outside-toplevel
    model, report = hf.load_pretrained(model_name, heads.MaskedLM)
    head = [k for k in report.missing if not k.startswith("bert.")]
    if head:
      raise ConfigError(
          f"config.method_options.augment.mlm_model={model_name!r} has no masked-LM head "
          f"(newly initialised: {', '.join(head)}); its predictions would be "
          "noise. Use a checkpoint saved with its MLM head (a "
          "BertForMaskedLM / RobertaForMaskedLM directory)")
    if model.cfg.vocab_size != len(words.continues):
      raise ConfigError(
          f"config.method_options.augment.mlm_model={model_name!r} has a vocabulary of "
          f"{model.cfg.vocab_size}; the training tokenizer's has "
          f"{len(words.continues)}: the MLM must share the tokenizer")
    self.model, self.words, self.batch_size = model, words, batch_size
    self.mask_id = words.tokenizer.mask_token_id
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    # Never predicted: special tokens and WordPiece continuations.
    banned = jnp.asarray(words.special | words.continues)

    # Built once: each epoch's call (regenerate="epoch") reuses the compile.
    @nnx.jit
    def predict(model, ids, types, attention, original):
      logits = model(ids, attention, types)  # [n, L, vocab]
      logits = jnp.where(banned, -jnp.inf, logits)
      logits = jnp.where(jax.nn.one_hot(original, logits.shape[-1], dtype=bool),
                         -jnp.inf, logits)
      return jnp.argmax(logits, -1)

    self._predict = predict

  def __call__(self, jobs):
    """jobs: [(index, ids, types, where)] -> new ids per job."""
    width = max(len(ids) for _, ids, _, _ in jobs)
    out = []
    for s in range(0, len(jobs), self.batch_size):
      chunk = jobs[s:s + self.batch_size]
      n = self.batch_size  # one shape for every chunk: one compilation
      ids = np.zeros((n, width), np.int32)
      types, att = np.zeros_like(ids), np.zeros_like(ids)
      where = np.zeros((n, width), bool)
      for r, (_, i, t, w) in enumerate(chunk):
        ids[r, :len(i)], types[r, :len(i)], att[r, :len(i)] = i, t, 1
        where[r, :len(i)] = w
      masked = np.where(where, self.mask_id, ids)
      pred = np.asarray(self._predict(self.model, masked, types, att, ids))
      for r, (_, i, _, w) in enumerate(chunk):
        out.append(np.where(w, pred[r, :len(i)], i).astype(np.int32))
    return out


def from_options(a, seed, split, tokenizer, special):
  """Augmentation options `a` applied to the training split.

  Every set made is logged: its size and a few examples (with its epoch).

  Returns:
    (split, split_at): the augmented set with regenerate="once", epoch 0's
    with "epoch"; and with regenerate="epoch" `split_at(epoch)`, which makes
    that epoch's set (for `data.EpochBatcher`), else None.
  """
  words = Words(tokenizer, special)
  mlm = (MaskedLM(a.mlm_model, words, a.mlm_batch_size)
         if "contextual" in a.ops else None)

  def split_at(epoch):
    out = augment(split, words, ops=tuple(a.ops), copies=a.copies,
                  rate=a.rate, seed=seed, epoch=epoch, mlm=mlm)
    _log(split, out, tokenizer, a, epoch)
    return out

  if a.regenerate == "once":
    return split_at(None), None
  return split_at(0), split_at


def _log(split, out, tokenizer, a, epoch):
  """The set's size and its first `log_examples` examples with their copies."""
  log.info("augment: %d training examples -> %d (%d copies, ops %s, "
           "rate %g; %s)", len(split), len(out), a.copies, ", ".join(a.ops),
           a.rate, "made once" if epoch is None else f"epoch {epoch}'s copies")
  n = len(split)
  for i in range(min(a.log_examples, n)):
    # The originals are the same every epoch: shown with the first set.
    for c in range(0 if epoch in (None, 0) else 1, a.copies + 1):
      j = c * n + i
      text = tokenizer.decode(out.input_ids[out.offsets[j]:out.offsets[j + 1]])
      log.info("  %s %d: %s", "original" if c == 0 else f"copy {c} of", i,
               text)
