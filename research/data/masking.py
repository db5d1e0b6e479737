"""BERT's masked-LM corruption as a pure JAX function of (batch, key).

Why JAX in the jitted step rather than numpy on the host:
  * Exact resume for free: the masks are a function of `fold_in(seed, step)`,
    the key the step's transform hook already receives, and of nothing else:
    no host RNG state to checkpoint, and a resumed run draws the same masks.
  * Sharding-invariant: with `jax_threefry_partitionable` (the default since
    JAX 0.5) the random bits do not depend on how the batch is laid out, so 1
    device and an 8-way FSDP mesh mask the same tokens (tested).
  * Cost: a few element-wise ops on [B, L], fused by XLA and negligible next
    to the encoder; the host sends only the rows (no labels, no extra
    arrays), and never spends Python time per step on random draws.
  Host numpy seeded by `default_rng([seed, step])` would also resume exactly,
  but it costs host time every step on every process and doubles what is
  copied to the devices.

Typical use as the per-step transform hook:

  transform = masking.make_transform(tokenizer, mask_rate=0.15,
                                     mode="whole_word")
  batch = transform(batch, jax.random.fold_in(seed_key, step))  # in jit
  # batch["input_ids"] corrupted, batch["labels"] = original id or -100

Modes: what is chosen together. Every unit is chosen with the same
probability, so about `mask_rate` of the tokens are predicted in each mode:
  token       each token on its own (BERT, RoBERTa, Hugging Face's collator);
  whole_word  every sub-token of a word (BERT's whole-word-masking release);
  span        SpanBERT (Joshi et al. 2020): spans of whole words, lengths
              drawn from a geometric distribution (p = 0.2) truncated at 10
              words (mean 3.8), started at each word with the rate that
              covers `mask_rate` of the words (`span_start_rate`);
  knowledge   ERNIE 1.0 (Sun et al. 2019): a name of a knowledge list
              (entities, glossary terms; `research.data.knowledge`) found in
              the token ids on word boundaries is one unit, masked whole;
              every other word is a unit as in whole_word.
The 80/10/10 replacement is drawn per token in every mode, as in BERT's
whole-word release.

Sparse prediction (`max_predictions` > 0): at most that many tokens are
predicted per row (BERT's `max_predictions_per_seq`); a row that draws more
keeps its first units that fit (whole units: a word or span is never cut)
and leaves the rest unmasked and unpredicted, and the transform adds
`masked_positions` [B, max_predictions], the positions the head decodes.
The labels say the same, so a dense and a sparse loss over one transformed
batch are equal.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100  # Label of a token that is not predicted (as in PyTorch / HF).
MODES = ("token", "whole_word", "span", "knowledge")
SPAN_P, SPAN_MAX = 0.2, 10  # SpanBERT's geometric parameter and longest span


def check_rates(mask_rate, mask_frac=0.8, random_frac=0.1):
  """Raises ValueError, naming the field, for rates BERT masking cannot use."""
  if not isinstance(mask_rate, (int, float)) or not 0 < mask_rate < 1:
    raise ValueError(f"mask_rate must be a number in (0, 1) (BERT: 0.15), "
                     f"got {mask_rate!r}")
  for name, value in (("mask_frac", mask_frac), ("random_frac", random_frac)):
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
      raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
  if mask_frac + random_frac > 1:
    raise ValueError(f"mask_frac + random_frac must be <= 1 (BERT: 0.8 + "
                     f"0.1), got {mask_frac} + {random_frac}")


# --- Units: which tokens are chosen together ------------------------------------


def unit_starts(word_starts, special_mask):
  """Starts of the units: `word_starts`, every special token and the token
  after one. A word never reaches across [SEP] into the next document, and a
  fragment ("##ing") that a row cut left after [CLS] is a word of its own."""
  special_mask = jnp.asarray(special_mask, bool)
  after_special = jnp.concatenate(
      [jnp.ones_like(special_mask[..., :1]), special_mask[..., :-1]], -1)
  return jnp.asarray(word_starts, bool) | special_mask | after_special


def _positions(x):
  return jnp.broadcast_to(jnp.arange(x.shape[-1]), x.shape)


def _first_of_unit(starts):
  """The position of each token's unit start [..., L]."""
  return jax.lax.cummax(jnp.where(starts, _positions(starts), 0),
                        axis=starts.ndim - 1)


def _shift(x, j, fill):
  """x shifted right by j along the last axis, `fill` coming in."""
  if j == 0:
    return x
  pad = jnp.full(x.shape[:-1] + (j,), fill, x.dtype)
  return jnp.concatenate([pad, x[..., :-j]], axis=-1)


def choose_units(key, starts, special_mask, rate):
  """Each unit (from each start to the next) chosen with probability `rate`."""
  draw = jax.random.uniform(key, starts.shape)
  draw = jnp.take_along_axis(draw, _first_of_unit(starts), axis=-1)
  return (draw < rate) & ~special_mask


def span_length_probs(p=SPAN_P, max_len=SPAN_MAX):
  """P(length = 1..max_len) of SpanBERT's geometric distribution, truncated
  (renormalised) at `max_len`: mean 3.8 words for p = 0.2, max_len = 10."""
  probs = p * (1 - p) ** np.arange(max_len)
  return probs / probs.sum()


def span_start_rate(rate, p=SPAN_P, max_len=SPAN_MAX):
  """The per-word start probability q at which spans cover `rate` of words.

  A word is covered unless none of the `max_len` words up to it starts a
  span long enough: coverage = 1 - prod_j (1 - q P(length > j)), solved for
  q by bisection (q = 1 covers every word, so any rate in (0, 1) has one).
  """
  longer = 1 - np.concatenate([[0.0], np.cumsum(span_length_probs(
      p, max_len))[:-1]])  # P(length > j), j = 0..max_len-1
  cover = lambda q: 1 - np.prod(1 - q * longer)  # pylint: disable=unnecessary-lambda-assignment
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if cover(mid) < rate else (lo, mid)
  return (lo + hi) / 2


def choose_spans(key, starts, special_mask, rate, p=SPAN_P, max_len=SPAN_MAX):
  """SpanBERT's spans of whole words covering `rate` of the words [..., L].

  Words are numbered in each row; every word (and `max_len` virtual words
  before the row, so that the first words are covered as often as any)
  starts a span with probability `span_start_rate(rate)`, of a length drawn
  from `span_length_probs`. A word is chosen when a span covers it, all its
  sub-tokens together; special tokens never are (a span may run on past a
  [SEP]: the special token itself stays).
  """
  k_start, k_len = jax.random.split(key)
  length = starts.shape[-1]
  word = jnp.cumsum(starts, axis=-1) - 1 + max_len  # index in the word arrays
  shape = starts.shape[:-1] + (length + max_len,)
  start = jax.random.uniform(k_start, shape) < span_start_rate(
      rate, p, max_len)
  cdf = jnp.asarray(np.cumsum(span_length_probs(p, max_len)), jnp.float32)
  span = 1 + jnp.sum(jax.random.uniform(k_len, shape)[..., None] > cdf[:-1],
                     axis=-1)  # 1..max_len
  covered = jnp.zeros(shape, bool)
  for j in range(max_len):  # covered by the span of the word j back
    covered = covered | _shift(start & (span > j), j, False)
  return jnp.take_along_axis(covered, word, axis=-1) & ~special_mask


def cap_predictions(chosen, starts, max_predictions):
  """Keeps each row's first chosen units while they fit `max_predictions`
  tokens: a unit is kept or dropped whole."""
  length = chosen.shape[-1]
  count = jnp.cumsum(chosen, axis=-1)  # chosen tokens up to here
  # The last token of each token's unit: the next start, minus one.
  next_start = jax.lax.cummin(
      jnp.where(jnp.concatenate([starts[..., 1:], jnp.ones_like(
          starts[..., :1])], -1), _positions(starts) + 1, length),
      axis=starts.ndim - 1, reverse=True)
  unit_end = jnp.minimum(next_start, length) - 1
  return chosen & (jnp.take_along_axis(count, unit_end, axis=-1)
                   <= max_predictions)


def predicted_positions(labels, max_predictions):
  """int32 [..., max_predictions]: the predicted positions of each row first
  (in order), then unpredicted ones (label -100: weight 0). All distinct, so
  a scatter back to [..., L] never collides."""
  order = jnp.argsort(labels == IGNORE, axis=-1, stable=True)
  return order[..., :max_predictions].astype(jnp.int32)


# --- The corruption ----------------------------------------------------------------


def mask_tokens(input_ids, special_mask, key, *, mask_token_id, vocab_size,
                mask_rate=0.15, word_starts=None, spans=False,
                span_p=SPAN_P, span_max=SPAN_MAX, max_predictions=0,
                mask_frac=0.8, random_frac=0.1):
  """Chooses tokens to predict and corrupts them, BERT-style.

  Each unit that is not special is chosen with probability `mask_rate`
  (independently, as in Hugging Face's data collator and RoBERTa; BERT's
  original code picked exactly round(0.15 n) per row): a token, or with
  `word_starts` a word (every sub-token takes the draw of its word's first
  token), or with `spans` a SpanBERT span of words. A chosen token becomes
  [MASK] with probability `mask_frac`, a uniformly random id in
  [0, vocab_size) with probability `random_frac`, and stays as it is
  otherwise (per token in every mode, as in BERT's whole-word release).

  Args:
    input_ids: int [..., L] token ids.
    special_mask: bool [..., L], True where a token must never be chosen
      ([CLS], [SEP], padding); see `special_mask`.
    key: a JAX PRNG key, e.g. `fold_in(seed_key, step)`.
    mask_token_id: the id of [MASK].
    vocab_size: random replacements are drawn from [0, vocab_size).
    mask_rate: the fraction of tokens chosen, in (0, 1).
    word_starts: optional bool [..., L], True at the first sub-token of each
      unit: `word_start_table(tokenizer)[input_ids]` (words), or knowledge
      units (`research.data.knowledge.KnowledgeTable.unit_starts`).
    spans: SpanBERT spans of the units (`choose_spans`); needs `word_starts`.
    span_p, span_max: the spans' geometric parameter and longest span.
    max_predictions: > 0: at most this many chosen tokens per row
      (`cap_predictions`).
    mask_frac: the fraction of chosen tokens replaced by [MASK].
    random_frac: the fraction of chosen tokens replaced by a random id.

  Returns:
    (masked input ids like `input_ids`, labels int32 [..., L]: the original
    id where a token was chosen, -100 elsewhere).

  Raises:
    ValueError: a rate outside its range (checked when the rates are Python
      numbers, i.e. at trace time under jit), spans without word starts.
  """
  check_rates(mask_rate, mask_frac, random_frac)
  special_mask = jnp.asarray(special_mask, bool)
  k_choose, k_kind, k_random = jax.random.split(key, 3)
  if spans and word_starts is None:
    raise ValueError("span masking needs word_starts (word_start_table)")
  starts = (jnp.ones(input_ids.shape, bool) if word_starts is None
            else unit_starts(word_starts, special_mask))
  if spans:
    chosen = choose_spans(k_choose, starts, special_mask, mask_rate, span_p,
                          span_max)
  else:
    chosen = choose_units(k_choose, starts, special_mask, mask_rate)
  if max_predictions > 0:
    chosen = cap_predictions(chosen, starts, max_predictions)
  kind = jax.random.uniform(k_kind, input_ids.shape)
  random_ids = jax.random.randint(k_random, input_ids.shape, 0, vocab_size,
                                  dtype=input_ids.dtype)
  corrupted = jnp.where(kind < mask_frac, jnp.asarray(mask_token_id,
                                                      input_ids.dtype),
                        jnp.where(kind < mask_frac + random_frac, random_ids,
                                  input_ids))
  masked = jnp.where(chosen, corrupted, input_ids)
  labels = jnp.where(chosen, input_ids, IGNORE).astype(jnp.int32)
  return masked, labels


def special_mask(input_ids, special_ids, attention_mask=None):
  """True where a token is one of `special_ids` or (optionally) padding."""
  out = jnp.isin(input_ids, jnp.asarray(list(special_ids), input_ids.dtype))
  if attention_mask is not None:
    out = out | (jnp.asarray(attention_mask) == 0)
  return out


def word_start_table(tokenizer):
  """Returns bool [len(tokenizer)]: does this token id start a word?

  WordPiece (BERT): every token not starting with the continuing-subword
  prefix ("##"). Byte-level BPE (RoBERTa, GPT-2): tokens starting with "Ġ"
  (a space) start a word; so do special tokens.

  Raises:
    ValueError: a tokenizer model with no sub-word marker to read.
  """
  model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
  vocab = tokenizer.get_vocab()
  table = np.ones(len(tokenizer), bool)
  if model["type"] == "WordPiece":
    prefix = model.get("continuing_subword_prefix") or "##"
    for token, i in vocab.items():
      table[i] = not token.startswith(prefix)
  elif model["type"] == "BPE" and any(t.startswith("\u0120") for t in vocab):
    special = set(tokenizer.all_special_ids)
    for token, i in vocab.items():
      table[i] = token.startswith("\u0120") or i in special
  else:
    raise ValueError(
        f"whole-word masking needs word boundaries in the vocabulary: "
        f"WordPiece ('##') or byte-level BPE ('\u0120'); this tokenizer's "
        f"model is {model['type']}. Use masking mode 'token'.")
  return table


def default_max_predictions(length, mask_rate):
  """Sparse prediction's slots per row of `length`: twice the expected
  count, so that a row rarely draws more (then whole units are dropped)."""
  return max(1, min(length, math.ceil(2 * mask_rate * length)))


def make_transform(tokenizer, *, mask_rate=0.15, mode=None, whole_word=False,
                   knowledge=None, span_p=SPAN_P, span_max=SPAN_MAX,
                   max_predictions=None, mask_frac=0.8, random_frac=0.1):
  """Returns `transform(batch, key) -> batch` for the training step's hook.

  The returned function is pure and jittable: it replaces
  `batch["input_ids"]` by the corrupted ids and adds `batch["labels"]`
  (int32, -100 where nothing is predicted) and, for sparse prediction,
  `batch["masked_positions"]` (int32 [B, P]). Padding
  (`attention_mask == 0`) and the tokenizer's special tokens are never
  chosen.

  Args:
    tokenizer: the Hugging Face tokenizer of the corpus.
    mask_rate: the fraction of tokens chosen, in (0, 1).
    mode: one of `MODES` (default: whole_word if `whole_word` else token).
    whole_word: the same as mode="whole_word".
    knowledge: mode "knowledge": a `research.data.knowledge.KnowledgeTable`.
    span_p, span_max: mode "span": the geometric parameter, the longest span.
    max_predictions: None: predict at every position (dense); an int P > 0:
      sparse prediction with P slots per row; 0: P =
      `default_max_predictions(L, mask_rate)` for the batch's row length L.
    mask_frac: chosen tokens replaced by [MASK].
    random_frac: chosen tokens replaced by a random id.

  Raises:
    ValueError: a rate outside its range, an unknown mode, mode "knowledge"
      without a table, a tokenizer without [MASK].
  """
  check_rates(mask_rate, mask_frac, random_frac)
  mode = mode or ("whole_word" if whole_word else "token")
  if mode not in MODES:
    raise ValueError(f"masking mode {mode!r}; valid: {', '.join(MODES)}")
  if (mode == "knowledge") != (knowledge is not None):
    raise ValueError("mode 'knowledge' needs a knowledge table (and only it "
                     "takes one)")
  if tokenizer.mask_token_id is None:
    raise ValueError("the tokenizer has no [MASK] token; masked-LM "
                     "pre-training needs one")
  special_ids = tuple(sorted(set(tokenizer.all_special_ids)))
  # numpy, not jnp: a transform first made inside a jitted step would keep
  # a tracer of that trace and leak it into the next (the evaluation's).
  starts = None if mode == "token" else word_start_table(tokenizer)
  mask_id, vocab_size = tokenizer.mask_token_id, len(tokenizer)

  def transform(batch, key):
    ids = batch["input_ids"]
    special = special_mask(ids, special_ids, batch.get("attention_mask"))
    words = None if starts is None else jnp.asarray(starts)[ids]
    if knowledge is not None:
      words = knowledge.unit_starts(ids, words, special)
    slots = None
    if max_predictions is not None:
      slots = max_predictions or default_max_predictions(ids.shape[-1],
                                                         mask_rate)
    masked, labels = mask_tokens(
        ids, special, key, mask_token_id=mask_id, vocab_size=vocab_size,
        mask_rate=mask_rate, word_starts=words, spans=mode == "span",
        span_p=span_p, span_max=span_max, max_predictions=slots or 0,
        mask_frac=mask_frac, random_frac=random_frac)
    out = dict(batch, input_ids=masked, labels=labels)
    if slots:
      out["masked_positions"] = predicted_positions(labels, slots)
    return out

  return transform
