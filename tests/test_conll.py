"""Tests of research/data/conll.py: reading, IOB1 -> IOB2, writing, sub-tokens.

Real data: ../shared/data/conll2003/valid.txt (CoNLL-2003 English dev:
3,250 sentences, 51,362 tokens, 5,942 entities, 216 documents; IOB2; see
../shared/data/SOURCES.md).
"""

import pathlib

import numpy as np
import pytest

from research import data
from research.data import conll
from research.data.errors import DataError
from tests.conftest import shared_data

NAMES = conll.CONLL2003_TAGS


@pytest.fixture(scope="module")
def valid():
  return conll.read_conll(str(shared_data("conll2003", "valid.txt")),
                          scheme="iob2")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return data.load_tokenizer(str(minilm_dir))


def write(tmp_path, content, name="x.txt"):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes)
                   else content.encode("utf-8"))
  return str(path)


def to_iob1(tags):
  """IOB2 -> IOB1: B- only where the previous tag has the same type."""
  return [("I-" + t[2:] if t.startswith("B-") and
           (j == 0 or tags[j - 1][2:] != t[2:]) else t)
          for j, t in enumerate(tags)]


# --- Reading ---------------------------------------------------------------------


def test_read_conll2003_valid(valid):
  assert len(valid.tokens) == 3250
  assert valid.num_tokens == 51362
  assert sum(t.startswith("B-") for s in valid.tags for t in s) == 5942
  assert len(set(valid.documents)) == 216 and valid.documents[0] == 0
  assert valid.documents[-1] == 215
  assert valid.converted == 0 and valid.skipped == {}
  assert valid.tokens[0][:3] == ["CRICKET", "-", "LEICESTERSHIRE"]
  assert valid.tags[0][:3] == ["O", "O", "B-ORG"]
  assert valid.rows[:3] == [3, 15, 18]  # After "-DOCSTART- O" and a blank.
  assert conll.entity_types(valid.tags) == ["LOC", "MISC", "ORG", "PER"]
  assert sorted(conll.iob2_tag_names(conll.entity_types(valid.tags))) == \
      sorted(NAMES)


def test_iob1_file_converted_to_the_same_iob2(valid, tmp_path):
  # Four columns (token POS chunk tag), tags rewritten as IOB1.
  lines = ["-DOCSTART- -X- -X- O", ""]
  changed = 0
  for tokens, tags in zip(valid.tokens, valid.tags):
    iob1 = to_iob1(tags)
    changed += sum(a != b for a, b in zip(iob1, tags))
    lines += [f"{w} NN I-NP {t}" for w, t in zip(tokens, iob1)] + [""]
  path = write(tmp_path, "\n".join(lines))
  got = conll.read_conll(path)
  assert got.tags == valid.tags and got.tokens == valid.tokens
  assert got.converted == changed > 5000  # Most entities start with I-.
  with pytest.raises(DataError, match=r"x.txt, line 5: I-ORG follows O: not "
                     "IOB2"):
    conll.read_conll(path, scheme="iob2")


def test_iob1_to_iob2_cases():
  assert conll.iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC",
                             "I-ORG"]) == \
      ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
  iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
  assert conll.iob1_to_iob2(iob2) == iob2


def test_layout_edge_cases(tmp_path):
  content = ("\ufeff-DOCSTART- O\r\n\r\n"
             "EU B-ORG \r\nrejects O\t\r\n\r\n\r\n\r\n"   # trailing spaces, CRLF
             "-DOCSTART- O\n"                             # no blank after it
             "Peter B-PER\nBlackburn I-PER\n"
             "-DOCSTART- O\n"                             # ends the sentence
             "-DOCSTART- O\n\n"                           # an empty document
             "BRUSSELS B-LOC")                            # no final newline
  got = conll.read_conll(write(tmp_path, content))
  assert got.tokens == [["EU", "rejects"], ["Peter", "Blackburn"],
                        ["BRUSSELS"]]
  assert got.tags == [["B-ORG", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
  assert got.rows == [3, 9, 14]
  assert got.documents == [0, 1, 2]


@pytest.mark.parametrize("content,message", [
    ("EU B-ORG\nrejects\n", r"x.txt, line 2: 1 column\(s\) where at least 2 "
     r"\(token ... tag\) are expected: 'rejects'"),
    ("EU NNP B-ORG\nrejects O\n", r"x.txt, line 2: 2 column\(s\) where 3 like "
     "the file's first token line are expected"),
    ("EU B-ORG\n\nrejects PER\n", r"x.txt, line 3: tag 'PER' is not an IOB "
     r"tag \(O, B-TYPE or I-TYPE\)"),
    ("EU B-ORG\n\nrejects B-\n", "line 3: tag 'B-' is not an IOB tag"),
    (b"EU B-ORG\nr\xe9jects O\n", "x.txt, line 2: not valid UTF-8"),
    ("\n\n-DOCSTART- O\n\n", "x.txt: no sentences"),
])
def test_malformed_lines_named(tmp_path, content, message):
  with pytest.raises(DataError, match=message):
    conll.read_conll(write(tmp_path, content))


def test_tag_set_and_skip(tmp_path):
  path = write(tmp_path, "EU B-ORG\nx O\n\nGerman B-FOO\n\nok O\nbad\nz O\n"
               "\nlast O\n")
  with pytest.raises(DataError, match=r"x.txt, line 4: tag 'B-FOO' is not in "
                     r"the tag set \['B-LOC', 'B-MISC'"):
    conll.read_conll(path, tag_set=NAMES)
  got = conll.read_conll(path, tag_set=NAMES, bad_rows="skip")
  assert got.tokens == [["EU", "x"], ["last"]]
  assert got.skipped == {conll.BAD_TAG: 1, conll.MALFORMED_LINE: 1}
  with pytest.raises(DataError, match="scheme must be one of"):
    conll.read_conll(path, scheme="iob1")
  with pytest.raises(DataError, match="no such file"):
    conll.read_conll(str(tmp_path / "missing.txt"))


def test_write_conll_round_trip(valid, tmp_path):
  path = str(tmp_path / "pred.txt")
  predicted = [["O"] * len(t) for t in valid.tags]
  conll.write_conll(path, valid.tokens, valid.tags, predicted)
  text = pathlib.Path(path).read_text(encoding="utf-8")
  assert text.startswith("CRICKET O O\n-", ) and "LEICESTERSHIRE B-ORG O\n" \
      in text
  assert text.count("\n\n") == 3250
  # The last column is the prediction, the middle one the gold.
  back = conll.read_conll(path)
  assert back.tokens == valid.tokens and back.tags == predicted
  lines = [l.split() for l in text.splitlines() if l]
  assert [l[1] for l in lines] == [t for s in valid.tags for t in s]
  with pytest.raises(ValueError, match="sentence 0: token 'a b' is empty or "
                     "contains whitespace"):
    conll.write_conll(path, [["a b"]], [["O"]], [["O"]])
  with pytest.raises(ValueError, match="sentence 0: 1 tokens, 1 gold and 2 "
                     "predicted"):
    conll.write_conll(path, [["a"]], [["O"]], [["O", "O"]])


# --- Sub-tokens ------------------------------------------------------------------


def test_align_labels_first_subtoken():
  ids = {n: i for i, n in enumerate(NAMES)}
  word_ids = [None, 0, 1, 1, 1, 2, None]
  tags = ["B-PER", "B-LOC", "O"]
  assert conll.align_labels(word_ids, tags, ids).tolist() == [
      -100, ids["B-PER"], ids["B-LOC"], -100, -100, ids["O"], -100]
  assert conll.align_labels(word_ids, tags, ids, label_all_subtokens=True,
                            ignore_index=-1).tolist() == [
      -1, ids["B-PER"], ids["B-LOC"], ids["I-LOC"], ids["I-LOC"], ids["O"], -1]
  with pytest.raises(DataError, match="tag 'I-LOC' is not in the label set"):
    conll.align_labels(word_ids, tags, {"O": 0, "B-PER": 1, "B-LOC": 2},
                       label_all_subtokens=True)


def test_word_predictions_inverse():
  # Word 1 has three sub-tokens (first one counts), word 3 was truncated.
  assert conll.word_predictions([None, 0, 1, 1, 1, 2, None],
                                ["x", "a", "b", "c", "d", "e", "y"], 4,
                                fill="O") == ["a", "b", "e", "O"]
  assert conll.word_predictions([-1, 0, -1], [5, 6, 7], 1) == [6]


def test_encode_conll2003_valid_round_trip(valid, tokenizer):
  enc = conll.encode_sentences(tokenizer, valid.tokens, valid.tags, NAMES,
                               max_length=512)
  assert enc.truncated == 0 and len(enc.num_words) == 3250
  labeled = enc.labels != -100
  # One label per word, on its first sub-token.
  assert labeled.sum() == 51362
  assert (enc.word_ids[labeled] >= 0).all()
  assert enc.input_ids[enc.offsets[:-1]].tolist() == [101] * 3250  # [CLS]
  # Decoding the gold labels as predictions gives back the word tags.
  assert enc.word_tags(np.where(labeled, enc.labels, 0), NAMES) == valid.tags
  # Later sub-tokens: "1996-08-30" (one word) is split; only its first piece
  # is labelled.
  i = valid.tokens[1].index("1996-08-30")
  part = slice(enc.offsets[1], enc.offsets[2])
  pieces = np.flatnonzero(enc.word_ids[part] == i)
  assert len(pieces) > 1
  assert enc.labels[part][pieces].tolist() == [0] + [-100] * (len(pieces) - 1)


def test_encode_label_all_and_truncation(valid, tokenizer):
  enc = conll.encode_sentences(tokenizer, valid.tokens, valid.tags, NAMES,
                               max_length=128, label_all_subtokens=True)
  # Three dev sentences are longer than 128 sub-tokens; their last words
  # (19 in all) are cut and come back as "O".
  assert enc.truncated == 3
  assert int(np.diff(enc.offsets).max()) == 128
  tags = enc.word_tags(enc.labels, NAMES)
  filled = 0
  for i in range(3250):
    words = enc.word_ids[enc.offsets[i]:enc.offsets[i + 1]]
    kept = int(words.max()) + 1
    filled += enc.num_words[i] - kept
    assert tags[i][:kept] == valid.tags[i][:kept]
    assert tags[i][kept:] == ["O"] * (enc.num_words[i] - kept)
  assert filled == 19
  # Every sub-token is labelled, B- only on a word's first piece.
  names = np.asarray(NAMES)
  real = enc.word_ids >= 0
  first = real & np.r_[True, enc.word_ids[1:] != enc.word_ids[:-1]]
  assert (enc.labels[real] >= 0).all()
  assert not np.char.startswith(names[enc.labels[real & ~first]], "B-").any()
  unlabeled = conll.encode_sentences(tokenizer, valid.tokens[:5], None, NAMES)
  assert (unlabeled.labels == -100).all()


# --- TFDS and Hugging Face -------------------------------------------------------


def test_tfds_path_gives_what_the_file_reader_gives(valid):
  # TFDS's conll2003 needs a download; mock_data's as_dataset_fn serves the
  # real dev sentences through the builder's feature spec instead.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  index = {n: i for i, n in enumerate(NAMES)}

  def as_dataset(self, split, **unused):
    del unused
    assert split == "validation"
    rows = [{"tokens": t, "ner": [index[x] for x in g], "pos": [0] * len(t),
             "chunks": [0] * len(t)} for t, g in zip(valid.tokens, valid.tags)]
    return tf.data.Dataset.from_generator(
        lambda: iter(rows),
        output_signature=self.info.features.get_tensor_spec())

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    got = conll.load_conll_tfds("validation")
  assert got.label_names == NAMES
  assert got.tokens == valid.tokens and got.tags == valid.tags
  assert got.rows[:2] == [1, 2] and got.documents is None


def test_hf_path_gives_what_the_file_reader_gives(valid, monkeypatch):
  # No hub here: load_dataset is replaced by a Dataset like a hub mirror's,
  # with another tag id order (the names come from the ClassLabel).
  import datasets  # pylint: disable=import-outside-toplevel
  order = ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG",
           "B-PER", "I-PER")
  features = datasets.Features({
      "tokens": datasets.Sequence(datasets.Value("string")),
      "ner_tags": datasets.Sequence(datasets.ClassLabel(names=list(order)))})
  table = datasets.Dataset.from_dict(
      {"tokens": valid.tokens[:500],
       "ner_tags": [[order.index(t) for t in s] for s in valid.tags[:500]]},
      features=features)
  calls = []

  def load_dataset(name, config, split, revision, cache_dir):
    calls.append((name, config, split, revision, cache_dir))
    return table

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  got = conll.load_conll_hf("validation",
                            revision="refs/convert/parquet")
  assert calls == [("eriktks/conll2003", None, "validation",
                    "refs/convert/parquet", None)]
  assert got.label_names == order
  assert got.tokens == valid.tokens[:500] and got.tags == valid.tags[:500]
  # Plain integer tags need their names.
  plain = table.cast(datasets.Features({
      "tokens": datasets.Sequence(datasets.Value("string")),
      "ner_tags": datasets.Sequence(datasets.Value("int64"))}))
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: plain)
  with pytest.raises(DataError, match=r"row 1: tag id 0 has no name \(pass "
                     "label_names\\)"):
    conll.load_conll_hf("validation")
  assert conll.load_conll_hf("validation", label_names=order).tags == \
      valid.tags[:500]

  def script(*unused, **unused_kw):
    raise RuntimeError("Dataset scripts are no longer supported, but found "
                       "conll2003.py")

  monkeypatch.setattr(datasets, "load_dataset", script)
  with pytest.raises(DataError, match="try revision='refs/convert/parquet'"):
    conll.load_conll_hf("validation")
