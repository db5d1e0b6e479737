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
                                     whole_word=True)
  batch = transform(batch, jax.random.fold_in(seed_key, step))  # in jit
  # batch["input_ids"] corrupted, batch["labels"] = original id or -100
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100  # Label of a token that is not predicted (as in PyTorch / HF).


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


def mask_tokens(input_ids, special_mask, key, *, mask_token_id, vocab_size,
                mask_rate=0.15, word_starts=None, mask_frac=0.8,
                random_frac=0.1):
  """Chooses tokens to predict and corrupts them, BERT-style.

  Each token that is not special is chosen with probability `mask_rate`
  (independently, as in Hugging Face's data collator and RoBERTa; BERT's
  original code picked exactly round(0.15 n) per row). A chosen token becomes
  [MASK] with probability `mask_frac`, a uniformly random id in
  [0, vocab_size) with probability `random_frac`, and stays as it is
  otherwise. With `word_starts`, whole words are chosen: every sub-token takes
  the draw of its word's first token, so a word is masked entirely or not at
  all (the 80/10/10 choice stays per token, as in BERT's release).

  Args:
    input_ids: int [..., L] token ids.
    special_mask: bool [..., L], True where a token must never be chosen
      ([CLS], [SEP], padding); see `special_mask`.
    key: a JAX PRNG key, e.g. `fold_in(seed_key, step)`.
    mask_token_id: the id of [MASK].
    vocab_size: random replacements are drawn from [0, vocab_size).
    mask_rate: the fraction of tokens chosen, in (0, 1).
    word_starts: optional bool [..., L], True at the first sub-token of each
      word (`word_start_table(tokenizer)[input_ids]`).
    mask_frac: the fraction of chosen tokens replaced by [MASK].
    random_frac: the fraction of chosen tokens replaced by a random id.

  Returns:
    (masked input ids like `input_ids`, labels int32 [..., L]: the original
    id where a token was chosen, -100 elsewhere).

  Raises:
    ValueError: a rate outside its range (checked when the rates are Python
      numbers, i.e. at trace time under jit).
  """
  check_rates(mask_rate, mask_frac, random_frac)
  special_mask = jnp.asarray(special_mask, bool)
  k_choose, k_kind, k_random = jax.random.split(key, 3)
  draw = jax.random.uniform(k_choose, input_ids.shape)
  if word_starts is not None:
    # Index of each token's word start. Special tokens and the token after
    # one start words: a word never reaches across [SEP] into the next
    # document, and a fragment ("##ing") that a row cut left after [CLS] is
    # a word of its own.
    after_special = jnp.concatenate(
        [jnp.ones_like(special_mask[..., :1]), special_mask[..., :-1]], -1)
    starts = jnp.asarray(word_starts, bool) | special_mask | after_special
    position = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]),
                                input_ids.shape)
    first = jax.lax.cummax(jnp.where(starts, position, 0),
                           axis=input_ids.ndim - 1)
    draw = jnp.take_along_axis(draw, first, axis=-1)
  chosen = (draw < mask_rate) & ~special_mask
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
        f"model is {model['type']}. Set whole_word=False.")
  return table


def make_transform(tokenizer, *, mask_rate=0.15, whole_word=False,
                   mask_frac=0.8, random_frac=0.1):
  """Returns `transform(batch, key) -> batch` for the training step's hook.

  The returned function is pure and jittable: it replaces
  `batch["input_ids"]` by the corrupted ids and adds `batch["labels"]`
  (int32, -100 where nothing is predicted). Padding (`attention_mask == 0`)
  and the tokenizer's special tokens are never chosen.

  Args:
    tokenizer: the Hugging Face tokenizer of the corpus.
    mask_rate: the fraction of tokens chosen, in (0, 1).
    whole_word: choose whole words (see `mask_tokens`).
    mask_frac: chosen tokens replaced by [MASK].
    random_frac: chosen tokens replaced by a random id.

  Raises:
    ValueError: a rate outside its range, a tokenizer without [MASK].
  """
  check_rates(mask_rate, mask_frac, random_frac)
  if tokenizer.mask_token_id is None:
    raise ValueError("the tokenizer has no [MASK] token; masked-LM "
                     "pre-training needs one")
  special_ids = tuple(sorted(set(tokenizer.all_special_ids)))
  starts = jnp.asarray(word_start_table(tokenizer)) if whole_word else None
  mask_id, vocab_size = tokenizer.mask_token_id, len(tokenizer)

  def transform(batch, key):
    ids = batch["input_ids"]
    masked, labels = mask_tokens(
        ids, special_mask(ids, special_ids, batch.get("attention_mask")), key,
        mask_token_id=mask_id, vocab_size=vocab_size, mask_rate=mask_rate,
        word_starts=None if starts is None else starts[ids],
        mask_frac=mask_frac, random_frac=random_frac)
    return dict(batch, input_ids=masked, labels=labels)

  return transform
