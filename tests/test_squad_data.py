"""Tests of research/data/squad.py: readers, bad questions, windowed features.

Real data: ../shared/data/squad/train-v2.0_first10articles.json (the first 10
articles of SQuAD v2.0 train: 4,719 questions, 348 unanswerable, 694
paragraphs; see ../shared/data/SOURCES.md).
"""

import collections
import json
import math

import numpy as np
import pytest

from research import data
from research.data import squad
from research.data.errors import DataError
from tests.conftest import shared_data



@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return data.load_tokenizer(str(minilm_dir))


@pytest.fixture(scope="module")
def real():
  return squad.read_squad(str(shared_data(
      "squad", "train-v2.0_first10articles.json")))


@pytest.fixture(scope="module")
def real_features(tokenizer, real):
  return squad.build_features(tokenizer, real.examples)


def write_squad(tmp_path, qas, context="Normandy is a region in France.",
                version="v2.0"):
  path = tmp_path / "squad.json"
  path.write_text(json.dumps({"version": version, "data": [
      {"title": "Normans", "paragraphs": [{"context": context, "qas": qas}]}]}))
  return str(path)


def qa(qid="q1", text="France", start=24, impossible=None, **extra):
  out = {"id": qid, "question": "Where is Normandy?",
         "answers": [] if text is None else [{"text": text,
                                              "answer_start": start}]}
  if impossible is not None:
    out["is_impossible"] = impossible
  out.update(extra)
  return out


# --- Reading ---------------------------------------------------------------------


def test_read_real_file(real):
  assert real.version_2 and real.skipped == {}
  assert len(real.examples) == 4719
  assert sum(ex.is_impossible for ex in real.examples) == 348
  assert len({ex.context for ex in real.examples}) == 694
  assert len({ex.title for ex in real.examples}) == 10
  first = real.examples[0]
  assert (first.id, first.title, first.answers, first.answer_starts) == (
      "56be85543aeaaa14008c9063", "Beyoncé", ("in the late 1990s",), (269,))
  assert first.question == "When did Beyonce start becoming popular?"
  for ex in real.examples:
    assert bool(ex.answers) != ex.is_impossible
    for text, start in zip(ex.answers, ex.answer_starts):
      assert ex.context[start:start + len(text)] == text
  gold = squad.gold_answers(real.examples)
  assert len(gold) == 4719 and gold[first.id] == ["in the late 1990s"]


def test_read_v1_file(tmp_path):
  path = write_squad(tmp_path, [qa()], version="1.1")
  got = squad.read_squad(path)
  assert not got.version_2
  assert got.examples == [squad.SquadExample(
      id="q1", title="Normans", context="Normandy is a region in France.",
      question="Where is Normandy?", answers=("France",),
      answer_starts=(24,), is_impossible=False)]


def test_split_answerable_only_writes_v1_files(tmp_path):
  """v2.0 -> v1.1 files of the answerable questions, split by article."""
  articles = [{"title": f"A{i}", "paragraphs": [{
      "context": "Normandy is a region in France.",
      "qas": [qa(f"q{i}a", impossible=False),
              qa(f"q{i}b", text=None, impossible=True,
                 plausible_answers=[{"text": "France", "answer_start": 24}])]}]}
              for i in range(3)]
  path = tmp_path / "v2.json"
  path.write_text(json.dumps({"version": "v2.0", "data": articles}))
  train, dev = squad.split_by_article(str(path), str(tmp_path / "out"), [1],
                                      answerable=True)
  assert train.endswith("v2-v1.1-train.json") and dev.endswith("-dev.json")
  got_train, got_dev = squad.read_squad(train), squad.read_squad(dev)
  assert not got_train.version_2 and not got_dev.version_2
  assert [ex.id for ex in got_train.examples] == ["q0a", "q2a"]
  assert [ex.id for ex in got_dev.examples] == ["q1a"]
  with open(dev) as f:
    assert "plausible_answers" not in f.read()


@pytest.mark.parametrize("question,message", [
    (qa(start=40), r"squad.json, question q1: answer 'France' at "
     r"answer_start 40 lies outside the context \(31 characters\)"),
    (qa(start=-1), r"question q1: answer 'France' at answer_start -1 lies "
     "outside"),
    (qa(start=23), r"squad.json, question q1: answer text 'France' is not at "
     r"answer_start 23: the context there reads ' Franc'"),
    (qa(text=None), r"question q1: no answers \(and is_impossible is not "
     r"true\)"),
    (qa(impossible=True), "question q1: is_impossible is true but it has "
     "answers"),
    (qa(impossible="yes"), "question q1: is_impossible is 'yes'"),
    (qa(text=" "), "question q1: answer text ' ' is empty"),
    (qa(start="24"), "question q1: answer_start '24' is not an integer"),
    (qa(question=""), "question q1: the question text is missing"),
    (qa(answers=[{"text": "France"}]), r"question q1: 'answers' must be a "
     r"list of \{'text', 'answer_start'\} objects"),
])
def test_bad_question_named_by_file_and_id(tmp_path, question, message):
  path = write_squad(tmp_path, [question])
  with pytest.raises(DataError, match=message):
    squad.read_squad(path)


def test_skip_bad_questions_and_duplicates(tmp_path):
  path = write_squad(tmp_path, [
      qa("q1"), qa("q2", start=3), qa("q1"), qa("q3", text=None,
                                                 impossible=True)])
  with pytest.raises(DataError, match="question q1: the id is used by an "
                     "earlier question too"):
    squad.read_squad(path, check_spans=False)
  got = squad.read_squad(path, bad_rows="skip")
  assert [ex.id for ex in got.examples] == ["q1", "q3"]
  assert got.skipped == {squad.BAD_SPAN: 1, squad.BAD_QUESTION: 1}
  assert got.examples[1].is_impossible and got.examples[1].answers == ()
  # Without span checks (the official scoring uses the texts only) q2 stays.
  got = squad.read_squad(path, bad_rows="skip", check_spans=False)
  assert [ex.id for ex in got.examples] == ["q1", "q2", "q3"]


@pytest.mark.parametrize("content,message", [
    ("{", "not a valid JSON file"),
    ('{"version": "v2.0"}', "expected the official SQuAD layout"),
    ('{"data": [{"title": "T"}]}', "article 0 has no 'paragraphs' list"),
    ('{"data": [{"title": "T", "paragraphs": [{"context": "c"}]}]}',
     "article 'T', paragraph 0 has no 'qas' list"),
    ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": '
     '[{"question": "q", "answers": []}]}]}]}',
     "a question in article 'T' has no string 'id'"),
])
def test_malformed_file(tmp_path, content, message):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(DataError, match=f"bad.json: {message}"):
    squad.read_squad(str(path))
  with pytest.raises(DataError, match="no such file"):
    squad.read_squad(str(tmp_path / "missing.json"))


def _tfds_rows(examples, version_2):
  rows = []
  for ex in examples:
    row = {"id": ex.id, "title": ex.title, "context": ex.context,
           "question": ex.question,
           "answers": {"text": list(ex.answers),
                       "answer_start": list(ex.answer_starts)}}
    if version_2:
      row["is_impossible"] = ex.is_impossible
      row["plausible_answers"] = {"text": [], "answer_start": []}
    rows.append(row)
  return rows


@pytest.mark.parametrize("name,version_2", [("squad/v2.0", True),
                                             ("squad/v1.1", False)])
def test_tfds_path_gives_what_the_file_reader_gives(real, name, version_2):
  # TFDS has no offline SQuAD data; mock_data's as_dataset_fn serves real
  # examples through the TFDS builder (its real feature spec), so the
  # loader's decoding is what is tested.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  examples = [ex for ex in real.examples[:300]
              if version_2 or not ex.is_impossible]

  def as_dataset(self, split, **unused):
    del unused
    assert split == "validation"
    rows = _tfds_rows(examples, version_2)
    return tf.data.Dataset.from_generator(
        lambda: iter(rows),
        output_signature=self.info.features.get_tensor_spec())

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    got = squad.load_squad_tfds("validation", name)
  assert got.where == f"tfds {name} split 'validation'"
  assert got.version_2 == version_2
  assert got.examples == examples


def test_hf_path_gives_what_the_file_reader_gives(real, monkeypatch):
  # No hub here: load_dataset is replaced by a Dataset with the hub
  # dataset's columns (no is_impossible: empty answers mean unanswerable).
  import datasets  # pylint: disable=import-outside-toplevel
  examples = real.examples[:300]
  table = datasets.Dataset.from_list([
      {k: v for k, v in row.items()
       if k not in ("is_impossible", "plausible_answers")}
      for row in _tfds_rows(examples, version_2=False)])
  calls = []

  def load_dataset(name, config, split, cache_dir):
    calls.append((name, config, split, cache_dir))
    return table

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  got = squad.load_squad_hf("validation")
  assert calls == [("rajpurkar/squad_v2", None, "validation", None)]
  assert got.version_2 and got.examples == examples
  assert not squad.load_squad_hf("validation", "rajpurkar/squad",
                                 version_2=False).version_2
  monkeypatch.setattr(datasets, "load_dataset",
                      lambda *a, **k: table.remove_columns(["context"]))
  with pytest.raises(DataError, match=r"hf rajpurkar/squad_v2 split "
                     r"'validation': no column\(s\) \['context'\]"):
    squad.load_squad_hf("validation")


# --- Features --------------------------------------------------------------------


def test_every_answer_recovered_from_its_windows(real, real_features):
  feats = real_features
  examples = real.examples
  per_example = np.bincount(feats.example_index, minlength=len(examples))
  assert len(feats) == per_example.sum() == 4812
  # Counted once from this file with doc_stride 128: 4,634 examples fit one
  # window, 77 need two, 8 need three.
  assert collections.Counter(per_example.tolist()) == {1: 4634, 2: 77, 3: 8}
  exact = inside = 0
  for f in range(len(feats)):
    ex = examples[feats.example_index[f]]
    tokens = slice(feats.offsets[f], feats.offsets[f + 1])
    spans, context = feats.char_spans[tokens], feats.is_context[tokens]
    s, e, cls = feats.start_positions[f], feats.end_positions[f], \
        feats.cls_index[f]
    assert cls == 0 and feats.input_ids[tokens][0] == 101  # [CLS]
    window = spans[context]
    holds = bool(ex.answers) and (
        window[0, 0] <= ex.answer_starts[0] and
        window[-1, 1] >= ex.answer_starts[0] + len(ex.answers[0]))
    if not holds:
      assert s == e == cls
      continue
    assert context[s] and context[e] and s <= e
    start_char, text = ex.answer_starts[0], ex.answers[0]
    end_char = start_char + len(text)
    recovered = ex.context[spans[s, 0]:spans[e, 1]]
    if recovered == text:
      exact += 1
    else:
      # The answer starts or ends inside a token ("7" of "1817"): the
      # tokens are the smallest ones covering it.
      inside += 1
      assert text in recovered
      assert spans[s, 0] <= start_char < spans[s, 1]
      assert spans[e, 0] < end_char <= spans[e, 1]
  # Every answerable question is held whole by at least one window.
  answered = np.zeros(len(examples), bool)
  answered[feats.example_index[feats.start_positions != feats.cls_index]] = 1
  assert answered.sum() == sum(not ex.is_impossible for ex in examples)
  assert (exact, inside) == (4358, 29)


def test_long_context_windows_cover_every_token(tokenizer, real,
                                                real_features):
  feats = real_features
  counts = np.bincount(feats.example_index)
  example = int(np.argmax(counts))
  ex = real.examples[example]
  context_spans = tokenizer(ex.context, add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
  assert len(context_spans) > 384 and counts[example] == 3
  windows = []
  for f in np.flatnonzero(feats.example_index == example):
    tokens = slice(feats.offsets[f], feats.offsets[f + 1])
    assert feats.lengths[f] <= 384
    windows.append([tuple(s) for s in
                    feats.char_spans[tokens][feats.is_context[tokens]]])
  # The windows, minus their overlaps, are the context's tokens in order.
  covered = windows[0] + [s for w in windows[1:] for s in w[128:]]
  assert covered == [tuple(s) for s in context_spans]
  for a, b in zip(windows, windows[1:]):
    assert a[-128:] == b[:128]  # doc_stride tokens shared


def test_window_count_formula(tokenizer, real, real_features):
  # Each window holds W = 384 - question tokens - 3 context tokens and
  # advances by W - 128: 1 + ceil((n - W) / (W - 128)) windows.
  examples = real.examples[::7]
  counts = np.bincount(real_features.example_index)[::7]
  questions = tokenizer([ex.question.lstrip() for ex in examples],
                        add_special_tokens=False)["input_ids"]
  contexts = tokenizer([ex.context for ex in examples],
                       add_special_tokens=False)["input_ids"]
  for q, c, got in zip(questions, contexts, counts):
    width = 384 - min(len(q), 64) - 3
    assert got == 1 + math.ceil(max(0, len(c) - width) / (width - 128))


def test_features_padded_and_long_questions(tokenizer):
  context = " ".join(f"w{i}" for i in range(300))
  ex = squad.SquadExample(id="q", title="", context=context,
                          question="why " * 100 + "?",
                          answers=("w299",),
                          answer_starts=(context.index("w299"),))
  feats = squad.build_features(tokenizer, [ex], max_length=64, doc_stride=16,
                               max_query_length=8)
  # The question is cut to 8 tokens: [CLS] 8 [SEP] context [SEP].
  first = slice(feats.offsets[0], feats.offsets[1])
  assert list(feats.token_type_ids[first][:10]) == [0] * 10
  assert feats.token_type_ids[first][10] == 1
  assert feats.is_context[first][10] and not feats.is_context[first][9]
  # Only the last window holds the answer.
  last = len(feats) - 1
  assert (feats.start_positions[:last] == 0).all()
  tokens = slice(feats.offsets[last], feats.offsets[last + 1])
  span = feats.char_spans[tokens][feats.start_positions[last]]
  assert context[span[0]:feats.char_spans[tokens][
      feats.end_positions[last]][1]] == "w299"
  ids = feats.padded("input_ids")
  assert ids.shape == (len(feats), 64)
  np.testing.assert_array_equal(ids[last, :feats.lengths[last]],
                                feats.input_ids[tokens])
  assert (ids[last, feats.lengths[last]:] == 0).all()
  assert feats.padded("char_spans", fill=-1).shape == (len(feats), 64, 2)
  with pytest.raises(DataError, match=r"doc_stride=60 must be in \[0, 53\)"):
    squad.build_features(tokenizer, [ex], max_length=64, doc_stride=60,
                         max_query_length=8)
