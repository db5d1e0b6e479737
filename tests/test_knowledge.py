"""Knowledge lists: reading, matching names in token ids, knowledge masking."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import data
from research.data import knowledge, masking
from research.data.errors import DataError

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_VALID = SHARED / "wikitext" / "wiki.valid.tokens"


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return data.load_tokenizer(str(minilm_dir))


def _ids(tokenizer, texts, length=24):
  enc = tokenizer(texts, padding="max_length", truncation=True,
                  max_length=length, return_tensors="np")
  return enc["input_ids"].astype(np.int32), enc["attention_mask"]


def _unit_starts(tokenizer, table, ids, mask):
  words = masking.word_start_table(tokenizer)[ids]
  special = np.isin(ids, tokenizer.all_special_ids) | (mask == 0)
  return np.asarray(table.unit_starts(jnp.asarray(ids), jnp.asarray(words),
                                      jnp.asarray(special)))


def _units(tokenizer, ids, starts, row):
  """The row's units as strings (specials left out)."""
  out, current = [], []
  for i, s in zip(ids[row], starts[row]):
    if s and current:
      out.append(current)
      current = []
    current.append(int(i))
  out.append(current)
  return [tokenizer.decode(u) for u in out
          if not set(u) & set(tokenizer.all_special_ids)]


def test_read_names_skips_blanks_comments_and_repeats(tmp_path):
  path = tmp_path / "names.txt"
  path.write_text("# entities\nNew York\n\n  Paris  \nNew York\n")
  assert knowledge.read_names(str(path)) == ["New York", "Paris"]
  with pytest.raises(DataError, match="no such file"):
    knowledge.read_names(str(tmp_path / "missing.txt"))
  (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe\n")
  with pytest.raises(DataError, match=r"bin.txt, line 2: not valid UTF-8"):
    knowledge.read_names(str(tmp_path / "bin.txt"))
  (tmp_path / "empty.txt").write_text("# nothing\n\n")
  with pytest.raises(DataError, match="no names"):
    knowledge.read_names(str(tmp_path / "empty.txt"))


def test_names_on_word_boundaries_longest_first_overlaps_joined(tokenizer):
  table = knowledge.KnowledgeTable.build(
      ["new york", "york", "york city", "united nations", "nations"],
      tokenizer)
  assert tokenizer.tokenize("yorkville")[0] == "york"  # a word "york" starts
  ids, mask = _ids(tokenizer, [
      "the new york city office and yorkville of the united nations",
      "york , nations ; new yorks"])
  starts = _unit_starts(tokenizer, table, ids, mask)
  assert _units(tokenizer, ids, starts, 0) == [
      "the", "new york city", "office", "and", "yorkville", "of", "the",
      "united nations"]
  # "york" alone matches; "new yorks" is not "new york" (word boundary).
  assert _units(tokenizer, ids, starts, 1) == [
      "york", ",", "nations", ";", "new", "yorks"]


def test_matches_equal_a_brute_force_search(tokenizer):
  """On real text with names cut from it (1-6 words), every match the
  hashed device search reports is what a plain search over the token ids
  finds, and nothing else."""
  if not WIKI_VALID.is_file():
    pytest.skip(f"needs {WIKI_VALID}")
  lines = [l for l in WIKI_VALID.read_text(encoding="utf-8").splitlines()
           if len(l.split()) > 8][:48]
  rng = np.random.default_rng(0)
  names = []
  for line in lines:
    words = line.split()
    for _ in range(4):
      n = int(rng.integers(1, 7))
      i = int(rng.integers(0, len(words) - n))
      names.append(" ".join(words[i:i + n]))
  table = knowledge.KnowledgeTable.build(names, tokenizer)
  ids, mask = _ids(tokenizer, lines, 128)
  words = masking.word_start_table(tokenizer)[ids]
  special = np.isin(ids, tokenizer.all_special_ids) | (mask == 0)
  starts = np.asarray(masking.unit_starts(words, special))
  got = np.asarray(jax.jit(table.match_lengths)(jnp.asarray(ids),
                                                jnp.asarray(starts)))
  entries = {tuple(t[:n]) for t, n in zip(table.tokens, table.lengths)}
  want = np.zeros_like(got)
  length = ids.shape[1]
  for b in range(len(ids)):
    for t in range(length):
      if not starts[b, t]:
        continue
      for n in range(table.max_tokens, 0, -1):
        if (t + n <= length and tuple(ids[b, t:t + n]) in entries
            and (t + n == length or starts[b, t + n])):
          want[b, t] = n
          break
  np.testing.assert_array_equal(got, want)
  assert (want > 1).sum() > 50  # many multi-token names found


def test_knowledge_spans_masked_whole_at_the_rate(tokenizer):
  """Every found name is chosen whole or not at all, as often as a word;
  ~15% of the tokens overall."""
  if not WIKI_VALID.is_file():
    pytest.skip(f"needs {WIKI_VALID}")
  lines = [l for l in WIKI_VALID.read_text(encoding="utf-8").splitlines()
           if len(l.split()) > 8][:64]
  names = knowledge.capitalised_phrases(lines)
  table = knowledge.KnowledgeTable.build(names, tokenizer)
  ids, mask = _ids(tokenizer, lines, 128)
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
  starts = _unit_starts(tokenizer, table, ids, mask)
  transform = masking.make_transform(tokenizer, mode="knowledge",
                                     knowledge=table)
  run = jax.jit(jax.vmap(lambda s: transform(batch, jax.random.fold_in(
      jax.random.key(0), s))))
  chosen = np.asarray(run(jnp.arange(40))["labels"]) != -100
  first = np.maximum.accumulate(np.where(starts, np.arange(128), 0), axis=1)
  at_start = np.take_along_axis(chosen, np.broadcast_to(first, chosen.shape),
                                axis=2)
  np.testing.assert_array_equal(chosen, at_start)  # units whole
  # Names of several words (units without a word start inside) exist and
  # are chosen at the unit rate.
  word = masking.word_start_table(tokenizer)[ids]
  lengths = np.diff(np.flatnonzero(np.append(starts.ravel(), True)))
  starts_flat = np.flatnonzero(starts.ravel())
  inner_words = np.array([word.ravel()[s + 1:s + n].any()
                          for s, n in zip(starts_flat, lengths)])
  multi = starts_flat[inner_words]
  assert len(multi) > 40
  rate = chosen.reshape(40, -1)[:, multi].mean()
  assert abs(rate - 0.15) < 5 * np.sqrt(0.15 * 0.85 / (40 * len(multi)))
  special = np.isin(ids, tokenizer.all_special_ids) | (mask == 0)
  assert abs(chosen[:, ~special].mean() - 0.15) < 0.01


def test_ignore_case_with_a_cased_tokenizer():
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Paris", "paris",
           "PARIS", "in", "is", "."]
  wp = tokenizers.Tokenizer(tokenizers.models.WordPiece(
      {t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
  wp.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]",
      cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
  ids = np.array([tok.convert_tokens_to_ids(
      ["[CLS]", "Paris", "is", "PARIS", "in", "paris", "[SEP]"])], np.int32)
  special = np.isin(ids, tok.all_special_ids)
  starts = masking.unit_starts(np.ones_like(special), special)
  for ignore_case, found in ((False, [0, 1, 0, 0, 0, 0, 0]),
                             (True, [0, 1, 0, 1, 0, 1, 0])):
    table = knowledge.KnowledgeTable.build(["Paris"], tok,
                                           ignore_case=ignore_case)
    np.testing.assert_array_equal(
        np.asarray(table.match_lengths(jnp.asarray(ids), starts))[0], found)


def test_unusable_names_are_counted_or_refused(tokenizer):
  table = knowledge.KnowledgeTable.build(
      ["paris", "[SEP]", " ", "a " * 20], tokenizer, max_tokens=16)
  assert table.stats["token sequences"] == 1
  assert table.stats["skipped: longer than 16 tokens"] == 1
  with pytest.raises(DataError, match="none of the 1 names has 1 to 16"):
    knowledge.KnowledgeTable.build(["[CLS]"], tokenizer)


def test_capitalised_phrases():
  texts = ["The United Nations met in New York on Monday.",
           "Officials of the Bank of England said the Monday meeting ended."]
  names = knowledge.capitalised_phrases(texts)
  assert "United Nations" in names and "New York" in names
  assert "Bank of England" in names and "Monday" in names
  assert "The" not in names and "Officials" not in names


def test_cli_writes_conll_entities(tmp_path):
  conll = tmp_path / "train.txt"
  conll.write_text("-DOCSTART- O\n\nEU B-ORG\nrejects O\nGerman B-MISC\n"
                   "call O\n\nPeter B-PER\nBlackburn I-PER\n\n"
                   "EU B-ORG\nagain O\n\n")
  out = tmp_path / "names.txt"
  assert knowledge.main(["--conll", str(conll), "--out", str(out)]) == 0
  assert out.read_text().splitlines() == ["EU", "German", "Peter Blackburn"]


def test_spacy_extractor_optional(tmp_path, capsys):
  """spaCy's entities and noun chunks where spaCy and a model are
  installed; otherwise a clear error saying how to install them."""
  text = tmp_path / "t.txt"
  text.write_text("The European Commission said on Thursday it disagreed.\n")
  out = tmp_path / "names.txt"
  code = knowledge.main(["--text", str(text), "--extractor",
                         "spacy:en_core_web_sm", "--out", str(out)])
  if code == 0:
    assert "The European Commission" in out.read_text().splitlines()
    return
  err = capsys.readouterr().err
  assert ("needs spaCy: pip install spacy" in err
          or "python -m spacy download en_core_web_sm" in err), err
  pytest.skip("spaCy or its model en_core_web_sm is not installed: the "
              "error says how to install them")
