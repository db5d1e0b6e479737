"""BERT masking: rates, 80/10/10, specials, whole words, keys, sharding."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import data
from research.data import masking
from tests.conftest import shared_data

DRAWS = 40


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return data.load_tokenizer(str(minilm_dir))


@pytest.fixture(scope="module")
def batch(tokenizer):
  """64 padded WikiText-2 rows of 128 tokens (real sub-word structure)."""
  lines = [l for l in shared_data("wikitext", "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
           if len(l.split()) > 8][:64]
  enc = tokenizer(lines, padding="max_length", truncation=True,
                  max_length=128, return_tensors="np")
  assert (enc["attention_mask"] == 0).any()  # Some padding to avoid.
  return {"input_ids": enc["input_ids"].astype(np.int32),
          "attention_mask": enc["attention_mask"].astype(np.int32)}


def _draws(transform, batch, seed=0):
  """DRAWS maskings of the batch, keys fold_in(seed, step)."""
  key = jax.random.key(seed)
  run = jax.jit(jax.vmap(lambda step: transform(batch, jax.random.fold_in(
      key, step))))
  out = run(jnp.arange(DRAWS))
  return np.asarray(out["input_ids"]), np.asarray(out["labels"])


def _within(observed, p, n, sigmas=5):
  return abs(observed - p) < sigmas * np.sqrt(p * (1 - p) / n)


def test_rates_and_80_10_10(tokenizer, batch):
  transform = masking.make_transform(tokenizer)
  masked, labels = _draws(transform, batch)
  ids = np.broadcast_to(batch["input_ids"], masked.shape)
  special = np.isin(ids, tokenizer.all_special_ids) | np.broadcast_to(
      batch["attention_mask"] == 0, ids.shape)
  chosen = labels != -100
  candidates = int((~special).sum())
  assert candidates > 100_000
  assert _within(chosen.sum() / candidates, 0.15, candidates)
  # Never a special token or padding; labels are the original ids.
  assert not chosen[special].any()
  np.testing.assert_array_equal(masked[special], ids[special])
  np.testing.assert_array_equal(labels[chosen], ids[chosen])
  np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
  n = int(chosen.sum())
  v = len(tokenizer)
  to_mask = masked[chosen] == tokenizer.mask_token_id
  kept = masked[chosen] == ids[chosen]
  # A random draw can hit [MASK] or the original id (1 in V each).
  assert _within(to_mask.mean(), 0.8 + 0.1 / v, n)
  assert _within(kept.mean(), 0.1 + 0.1 / v, n)
  assert _within((~to_mask & ~kept).mean(), 0.1 * (1 - 2 / v), n)
  # The random 10% are spread over the vocabulary, not a few ids.
  assert len(np.unique(masked[chosen][~to_mask & ~kept])) > 0.9 * (
      ~to_mask & ~kept).sum()


def test_other_mask_rate(tokenizer, batch):
  masked, labels = _draws(masking.make_transform(tokenizer, mask_rate=0.4),
                          batch)
  ids = np.broadcast_to(batch["input_ids"], masked.shape)
  ok = ~np.isin(ids, tokenizer.all_special_ids) & np.broadcast_to(
      batch["attention_mask"] == 1, ids.shape)
  assert _within((labels != -100)[ok].mean(), 0.4, int(ok.sum()))


def test_whole_words_together(tokenizer, batch):
  table = masking.word_start_table(tokenizer)
  assert table[tokenizer.convert_tokens_to_ids("una")]
  assert not table[tokenizer.convert_tokens_to_ids("##ffa")]
  assert table[tokenizer.cls_token_id] and table[tokenizer.pad_token_id]
  masked, labels = _draws(masking.make_transform(tokenizer, whole_word=True),
                          batch)
  ids = batch["input_ids"]
  special = np.isin(ids, tokenizer.all_special_ids)
  after_special = np.concatenate([special[:, :1] | True, special[:, :-1]], 1)
  starts = table[ids] | special | after_special
  first = np.maximum.accumulate(
      np.where(starts, np.arange(ids.shape[1]), 0), axis=1)  # word start
  chosen = labels != -100
  real = np.broadcast_to(~special, chosen.shape)
  at_start = np.take_along_axis(chosen, np.broadcast_to(first, chosen.shape),
                                axis=2)
  np.testing.assert_array_equal(chosen[real], at_start[real])  # no split word
  word_starts = real & np.broadcast_to(starts, chosen.shape)
  words = int(word_starts.sum())
  assert _within(chosen[word_starts].mean(), 0.15, words)
  # Some masked words really have several sub-tokens.
  multi = [(d, r) for d in range(DRAWS) for r in range(ids.shape[0])
           if (chosen[d, r] & ~table[ids[r]]).any()]
  assert len(multi) > 10
  assert not chosen[:, special].any()


@pytest.mark.parametrize("mode", ["whole_word", "span"])
def test_deterministic_per_key_different_per_step(tokenizer, batch, mode):
  transform = masking.make_transform(tokenizer, mode=mode, max_predictions=0)
  key = jax.random.key(7)
  a = transform(batch, jax.random.fold_in(key, 3))
  b = jax.jit(transform)(batch, jax.random.fold_in(key, 3))
  c = transform(batch, jax.random.fold_in(key, 4))
  np.testing.assert_array_equal(a["labels"], b["labels"])
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  assert not np.array_equal(a["labels"], c["labels"])
  np.testing.assert_array_equal(a["attention_mask"], batch["attention_mask"])


def test_same_masks_on_a_sharded_batch(tokenizer, batch):
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (simulated) devices: see conftest.py")
  mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(2, 4),
                           ("data", "fsdp"))
  spec = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  transform = jax.jit(masking.make_transform(tokenizer))
  key = jax.random.fold_in(jax.random.key(0), 11)
  one = transform(batch, key)
  sharded = transform(jax.device_put(batch, spec), key)
  assert len(sharded["labels"].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded["labels"]),
                                np.asarray(one["labels"]))
  np.testing.assert_array_equal(np.asarray(sharded["input_ids"]),
                                np.asarray(one["input_ids"]))


def test_mask_tokens_direct(tokenizer):
  ids = jnp.array([[101, 7592, 2088, 102, 0, 0]], jnp.int32)
  special = jnp.array([[1, 0, 0, 1, 1, 1]], bool)
  masked, labels = masking.mask_tokens(
      ids, special, jax.random.key(0), mask_token_id=103, vocab_size=30522,
      mask_rate=0.999, mask_frac=1.0, random_frac=0.0)
  np.testing.assert_array_equal(masked, [[101, 103, 103, 102, 0, 0]])
  np.testing.assert_array_equal(labels, [[-100, 7592, 2088, -100, -100,
                                          -100]])


def test_a_fragment_after_cls_is_a_word(tokenizer):
  una, ffa, ble, world = tokenizer.convert_tokens_to_ids(
      ["una", "##ffa", "##ble", "world"])
  ids = jnp.array([[101, ffa, ble, world, una, ffa, 102]] * 400, jnp.int32)
  special = ids == 101
  special = special | (ids == 102)
  starts = jnp.asarray(masking.word_start_table(tokenizer))[ids]
  _, labels = masking.mask_tokens(ids, special, jax.random.key(1),
                                  mask_token_id=103, vocab_size=30522,
                                  word_starts=starts, mask_rate=0.5)
  chosen = np.asarray(labels) != -100
  # Words: [##ffa ##ble] (a fragment after [CLS]), [world], [una ##ffa].
  np.testing.assert_array_equal(chosen[:, 1], chosen[:, 2])
  np.testing.assert_array_equal(chosen[:, 4], chosen[:, 5])
  assert not chosen[:, [0, 6]].any()
  for a, b in ((1, 3), (3, 4), (1, 4)):  # independent words
    assert (chosen[:, a] != chosen[:, b]).any()
  assert _within(chosen[:, 1].mean(), 0.5, 400)


@pytest.mark.parametrize("rate", [0, 1, 1.5, -0.1, "0.15"])
def test_mask_rate_outside_0_1_is_an_error(tokenizer, rate):
  with pytest.raises(ValueError, match=r"mask_rate must be a number in "
                     r"\(0, 1\) \(BERT: 0.15\), got"):
    masking.make_transform(tokenizer, mask_rate=rate)


def test_split_fractions_checked(tokenizer):
  with pytest.raises(ValueError, match=r"mask_frac \+ random_frac must be "
                     "<= 1"):
    masking.make_transform(tokenizer, mask_frac=0.9, random_frac=0.2)
  with pytest.raises(ValueError, match=r"random_frac must be a number in "
                     r"\[0, 1\]"):
    masking.make_transform(tokenizer, random_frac=-0.1)


def test_word_starts_of_a_byte_level_bpe(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(
      ["the unbelievable tokenisation of unbelievably long words"] * 20,
      vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<mask>"])
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
      sep_token="</s>", cls_token="<s>", pad_token="<pad>",
      mask_token="<mask>")
  table = masking.word_start_table(tok)
  ids = tok(" the unbelievable words", add_special_tokens=False)["input_ids"]
  tokens = tok.convert_ids_to_tokens(ids)
  assert [table[i] for i in ids] == [t.startswith("\u0120") for t in tokens]
  assert sum(table[i] for i in ids) == 3 and len(ids) > 3
  assert table[tok.mask_token_id]


def _words(tokenizer, ids):
  """Each token's word start [..., L] (specials and the token after one
  start words), as the masking sees them."""
  special = np.isin(ids, tokenizer.all_special_ids)
  after = np.concatenate([np.ones_like(special[..., :1]), special[..., :-1]],
                         -1)
  starts = masking.word_start_table(tokenizer)[ids] | special | after
  return starts, special


def _assert_no_split_unit(chosen, starts):
  """Every unit (from a start to the next) chosen whole or not at all."""
  first = np.maximum.accumulate(
      np.where(starts, np.arange(starts.shape[-1]), 0), axis=-1)
  first = np.broadcast_to(first, chosen.shape)
  at_start = np.take_along_axis(chosen, first, axis=-1)
  np.testing.assert_array_equal(chosen, at_start)


def test_span_masking_whole_words_at_the_rate(tokenizer, batch):
  """SpanBERT spans: never part of a word; 15% of the tokens over a large
  batch (40 draws of 64 rows); spans of several words."""
  transform = masking.make_transform(tokenizer, mode="span")
  masked, labels = _draws(transform, batch)
  ids = batch["input_ids"]
  starts, special = _words(tokenizer, ids)
  special = special | (batch["attention_mask"] == 0)
  chosen = labels != -100
  assert not chosen[:, special].any()
  _assert_no_split_unit(chosen, starts)
  real = ~np.broadcast_to(special, chosen.shape)
  rate = chosen[real].mean()
  assert abs(rate - 0.15) < 0.006, rate  # spans are correlated: 2-3 sigma
  # Runs of chosen words: SpanBERT's mean span is 3.8 words; merged
  # neighbours only lengthen runs.
  word_chosen = [chosen[d, r][np.broadcast_to(starts, chosen.shape)[d, r]
                              & real[d, r]]
                 for d in range(DRAWS) for r in range(ids.shape[0])]
  runs = [len(run) for row in word_chosen
          for run in "".join("x" if c else " " for c in row).split()]
  assert 3.3 < np.mean(runs) < 5.5, np.mean(runs)
  np.testing.assert_array_equal(labels[chosen], np.broadcast_to(
      ids, chosen.shape)[chosen])


def test_span_start_rate_covers_the_rate():
  probs = masking.span_length_probs()
  assert probs.sum() == pytest.approx(1.0)
  assert (probs * np.arange(1, 11)).sum() == pytest.approx(3.8, abs=0.05)
  q = masking.span_start_rate(0.15)
  longer = 1 - np.concatenate([[0], np.cumsum(probs)[:-1]])
  assert 1 - np.prod(1 - q * longer) == pytest.approx(0.15, abs=1e-9)
  assert masking.span_start_rate(0.15, max_len=1) == pytest.approx(0.15)


@pytest.mark.parametrize("mode", ["token", "whole_word", "span"])
def test_sparse_slots_cap_whole_units(tokenizer, batch, mode):
  """max_predictions: at most P tokens per row, whole units kept; positions
  list the predicted tokens first, all distinct."""
  slots = 12  # tight, so that many rows overflow
  transform = masking.make_transform(tokenizer, mode=mode,
                                     max_predictions=slots, mask_rate=0.3)
  key = jax.random.key(3)
  out = jax.jit(transform)(batch, key)
  labels = np.asarray(out["labels"])
  chosen = labels != -100
  positions = np.asarray(out["masked_positions"])
  assert positions.shape == (batch["input_ids"].shape[0], slots)
  assert chosen.sum(-1).max() <= slots and (chosen.sum(-1) >= slots - 9).mean() > 0.5
  for r in range(len(positions)):
    assert len(set(positions[r])) == slots
    n = chosen[r].sum()
    np.testing.assert_array_equal(np.sort(positions[r, :n]),
                                  np.flatnonzero(chosen[r]))
  if mode != "token":
    starts, _ = _words(tokenizer, batch["input_ids"])
    _assert_no_split_unit(chosen, starts)
  # Dropped units stay unmasked: only predicted tokens differ from the input.
  changed = np.asarray(out["input_ids"]) != batch["input_ids"]
  assert not changed[~chosen].any()
  # Without the cap (dense), the same key draws a superset.
  free = masking.make_transform(tokenizer, mode=mode, mask_rate=0.3)(batch,
                                                                     key)
  assert (np.asarray(free["labels"]) != -100)[chosen].all()
  assert "masked_positions" not in free


def test_default_slots_rarely_bind(tokenizer, batch):
  """The automatic P (2 x 15% x 128 = 39) leaves 15% masking unchanged."""
  assert masking.default_max_predictions(128, 0.15) == 39
  for mode in ("token", "span"):
    capped = masking.make_transform(tokenizer, mode=mode, max_predictions=0)
    free = masking.make_transform(tokenizer, mode=mode)
    a, b = _draws(capped, batch)[1], _draws(free, batch)[1]
    assert (a != b).mean() < 1e-3, mode


def test_unknown_mode_is_an_error(tokenizer):
  with pytest.raises(ValueError, match="masking mode 'words'; valid: token, "
                     "whole_word, span, knowledge"):
    masking.make_transform(tokenizer, mode="words")
  with pytest.raises(ValueError, match="mode 'knowledge' needs a knowledge "
                     "table"):
    masking.make_transform(tokenizer, mode="knowledge")


@pytest.mark.parametrize("mode", ["whole_word", "span"])
def test_a_transform_made_inside_one_jit_serves_another(tokenizer, batch,
                                                        mode):
  """The task makes its transform lazily, inside the first (training) step's
  trace; the evaluation step's trace must then reuse it without a leaked
  tracer."""
  made = {}

  def first(b, k):
    made["t"] = masking.make_transform(tokenizer, mode=mode)
    return made["t"](b, k)["labels"]

  key = jax.random.key(0)
  a = jax.jit(first)(batch, key)
  b = jax.jit(lambda b, k: made["t"](b, k)["labels"])(batch, key)
  np.testing.assert_array_equal(a, b)
