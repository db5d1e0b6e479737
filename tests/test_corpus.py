"""Pre-training corpora: sources, packing into rows, bounded memory, grain reads."""

import json
import os
import tracemalloc

import numpy as np
import pytest

from research import data
from research.data import corpus
from research.data.errors import DataError
from tests.conftest import shared_data



def _wiki_valid():
  return shared_data("wikitext", "wiki.valid.tokens")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return data.load_tokenizer(str(minilm_dir))


@pytest.fixture(scope="module")
def wiki(tmp_path_factory, tokenizer):
  """WikiText-2 valid in 128-token FULL-SENTENCES rows."""
  out = tmp_path_factory.mktemp("wiki") / "rows"
  info = corpus.build_corpus(corpus.TextFiles(str(_wiki_valid())), tokenizer,
                             str(out), seq_len=128)
  return info, corpus.Corpus(str(out))


def _ids(tokenizer, text):
  return tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
      "input_ids"]


def _rows(c):
  return np.stack([np.frombuffer(c.records[i], c.info.dtype)
                   for i in range(len(c))]).astype(np.int32)


def _content(row, info):
  """A row's tokens between [CLS] and its closing [SEP]."""
  assert row[0] == info.cls_id
  n = int((row != info.pad_id).sum())
  assert (row[n:] == info.pad_id).all(), "padding only at the end"
  assert row[n - 1] == info.sep_id
  return row[1:n - 1]


def _write(path, text, mode="w"):
  with open(path, mode) as f:
    f.write(text)
  return str(path)


def test_wikitext_valid_rows_lose_no_token(wiki, tokenizer):
  info, c = wiki
  lines = [l for l in _wiki_valid().read_text(encoding="utf-8").splitlines()
           if l.strip()]
  expected = [_ids(tokenizer, l) for l in lines]
  stream = np.concatenate([np.asarray(e) for e in expected])
  assert info.num_documents == len(lines) == 2461
  assert info.num_tokens == len(stream) == 260172
  rows = _rows(c)
  assert rows.shape == (info.num_rows, 128) and info.num_rows == 2085
  contents = [_content(r, info) for r in rows]
  # Separators sit between documents, never first or last in a row.
  assert all(r[0] != info.sep_id and r[-1] != info.sep_id for r in contents)
  # Only the last row may be padded beyond one slot (the one-short rows are
  # where a document ended one token before the row's end).
  assert all(len(r) >= 125 for r in contents[:-1])
  flat = np.concatenate(contents)
  np.testing.assert_array_equal(flat[flat != info.sep_id], stream)
  # Every document boundary inside a row is marked by exactly one [SEP].
  starts_in_row = int((flat == info.sep_id).sum())
  assert 0 < starts_in_row <= len(lines) - 1


def test_doc_packing_one_document_per_row(tmp_path, tokenizer):
  docs = ["short one.", "a " * 300 + "long document that fills rows",
          "third document here"]
  src = _write(tmp_path / "docs.txt", "\n".join(docs) + "\n")
  info = corpus.build_corpus(corpus.TextFiles(src), tokenizer,
                             str(tmp_path / "rows"), seq_len=32,
                             packing="doc")
  contents = [_content(r, info) for r in _rows(corpus.Corpus(info.directory))]
  expected = []
  for d in docs:
    ids = _ids(tokenizer, d)
    expected += [ids[i:i + 30] for i in range(0, len(ids), 30)]
  assert [list(r) for r in contents] == expected
  assert info.num_rows == len(expected) == 1 + 11 + 1


def test_blank_line_documents(tmp_path, tokenizer):
  src = _write(tmp_path / "b.txt",
               "first doc line one\nline two\n\n\nsecond doc\n\nthird\n")
  info = corpus.build_corpus(corpus.TextFiles(src, documents="blank_line"),
                             tokenizer, str(tmp_path / "rows"), seq_len=16,
                             packing="doc")
  assert info.num_documents == 3
  contents = [list(_content(r, info))
              for r in _rows(corpus.Corpus(info.directory))]
  assert contents == [_ids(tokenizer, "first doc line one line two"),
                      _ids(tokenizer, "second doc"), _ids(tokenizer, "third")]
  # FULL-SENTENCES: one row, documents separated by [SEP].
  full = corpus.build_corpus(corpus.TextFiles(src, documents="blank_line"),
                             tokenizer, str(tmp_path / "full"), seq_len=32)
  row = list(_content(_rows(corpus.Corpus(full.directory))[0], full))
  sep = [tokenizer.sep_token_id]
  assert row == contents[0] + sep + contents[1] + sep + contents[2]


def test_jsonl_text_field_and_errors(tmp_path, tokenizer):
  good = _write(tmp_path / "c.jsonl",
                "\n".join(json.dumps({"id": i, "body": f"document number {i}"})
                          for i in range(5)) + "\n")
  info = corpus.build_corpus(corpus.JsonLines(good, "body"), tokenizer,
                             str(tmp_path / "rows"), seq_len=16,
                             packing="doc")
  assert info.num_documents == 5
  first = _content(_rows(corpus.Corpus(info.directory))[0], info)
  assert list(first) == _ids(tokenizer, "document number 0")
  with pytest.raises(DataError, match=r"c.jsonl, line 1: no field 'text' "
                     r"\(the fields are \['body', 'id'\]\); set text_field"):
    corpus.build_corpus(corpus.JsonLines(good), tokenizer,
                        str(tmp_path / "x"))
  bad = _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
  with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON"):
    corpus.build_corpus(corpus.JsonLines(bad), tokenizer, str(tmp_path / "y"))
  num = _write(tmp_path / "num.jsonl", '{"text": 3}\n')
  with pytest.raises(DataError, match=r"num.jsonl, line 1: field 'text' is "
                     "int, not text"):
    corpus.build_corpus(corpus.JsonLines(num), tokenizer, str(tmp_path / "z"))


def test_bad_input_errors_name_file_and_line(tmp_path, tokenizer):
  empty = _write(tmp_path / "empty.txt", "\n  \n\n")
  with pytest.raises(DataError, match=r"empty.txt: empty corpus"):
    corpus.build_corpus(corpus.TextFiles(empty), tokenizer,
                        str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()  # Nothing half-built is left.
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".corpus")]
  binary = _write(tmp_path / "model.bin", b"ok line\n\x00\x01\x02\xff\n",
                  "wb")
  with pytest.raises(DataError, match=r"model.bin, line 2: contains a NUL "
                     "byte: not a text file"):
    corpus.build_corpus(corpus.TextFiles(binary), tokenizer,
                        str(tmp_path / "b"))
  latin1 = _write(tmp_path / "latin1.txt",
                  "fine\nalso fine\ncaf\xe9\n".encode("latin-1"), "wb")
  with pytest.raises(DataError, match=r"latin1.txt, line 3: not valid UTF-8 "
                     r"\(byte 3: b'\\xe9'\)"):
    corpus.build_corpus(corpus.TextFiles(latin1), tokenizer,
                        str(tmp_path / "c"))
  with pytest.raises(DataError, match=r"missing.txt: no such file"):
    corpus.build_corpus(corpus.TextFiles(str(tmp_path / "missing.txt")),
                        tokenizer, str(tmp_path / "d"))
  small = _write(tmp_path / "small.txt", "one tiny document\nand another\n")
  info = corpus.build_corpus(corpus.TextFiles(small), tokenizer,
                             str(tmp_path / "e"), seq_len=8, packing="doc")
  assert info.num_rows == 2
  with pytest.raises(DataError, match=r"from .*small.txt\): 2 rows of 8 "
                     r"tokens, fewer than one batch \(batch_size=4\)"):
    corpus.Corpus(info.directory).dataset(4, process_index=0,
                                          process_count=1)
  with pytest.raises(DataError, match="packing must be one of"):
    corpus.build_corpus(corpus.TextFiles(small), tokenizer,
                        str(tmp_path / "f"), packing="roberta")
  with pytest.raises(DataError, match="documents must be one of"):
    corpus.TextFiles(small, documents="paragraph")
  with pytest.raises(DataError, match="no corpus.json"):
    corpus.Corpus(str(tmp_path))


def test_built_once_then_reused(tmp_path, tokenizer):
  src = _write(tmp_path / "t.txt", "some text to tokenise\n" * 50)
  out = str(tmp_path / "rows")
  first = corpus.build_corpus(corpus.TextFiles(src), tokenizer, out,
                              seq_len=16)
  shard = os.path.join(out, first.shards[0])
  os.utime(shard, (0, 0))
  again = corpus.build_corpus(corpus.TextFiles(src), tokenizer, out,
                              seq_len=16)
  assert again == first and os.path.getmtime(shard) == 0  # Not rewritten.
  longer = corpus.build_corpus(corpus.TextFiles(src), tokenizer, out,
                               seq_len=32)
  assert longer.key != first.key and longer.num_rows < first.num_rows
  _write(src, "changed text\n" * 50)
  changed = corpus.build_corpus(corpus.TextFiles(src), tokenizer, out,
                                seq_len=32)
  assert changed.key != longer.key


def test_shards_split_rows(tmp_path, tokenizer):
  src = _write(tmp_path / "t.txt", "\n".join(f"document {i} has words"
                                             for i in range(100)))
  info = corpus.build_corpus(corpus.TextFiles(src), tokenizer,
                             str(tmp_path / "rows"), seq_len=8,
                             packing="doc", rows_per_shard=30, chunk_chars=64)
  assert info.num_rows == 100 and len(info.shards) == 4
  c = corpus.Corpus(info.directory)
  assert [list(_content(r, info)) for r in _rows(c)] == [
      _ids(tokenizer, f"document {i} has words") for i in range(100)]


def test_tfds_source_with_mock_data(tmp_path, tokenizer):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20):
    texts = [ex["text"].decode() for ex in tfds.as_numpy(
        tfds.load("lm1b", split="train"))]
    info = corpus.build_corpus(corpus.TfdsCorpus("lm1b", "train"), tokenizer,
                               str(tmp_path / "rows"), seq_len=32)
    with pytest.raises(DataError, match=r"tfds lm1b split 'train': no field "
                       r"'body' \(the fields are \['text'\]\)"):
      corpus.build_corpus(corpus.TfdsCorpus("lm1b", "train", "body"),
                          tokenizer, str(tmp_path / "x"))
  assert info.num_documents == len(texts) == 20
  flat = np.concatenate([_content(r, info)
                         for r in _rows(corpus.Corpus(info.directory))])
  stream = np.concatenate([_ids(tokenizer, t) for t in texts])
  np.testing.assert_array_equal(flat[flat != info.sep_id], stream)


def test_hf_sources(tmp_path, tokenizer):
  datasets = pytest.importorskip("datasets")
  texts = [f"hugging face row {i} with a sentence" for i in range(12)]
  ds = datasets.Dataset.from_dict({"content": texts, "n": list(range(12))})
  info = corpus.build_corpus(corpus.HfCorpus(dataset=ds, text_field="content"),
                             tokenizer, str(tmp_path / "rows"), seq_len=16,
                             packing="doc")
  rows = [list(_content(r, info))
          for r in _rows(corpus.Corpus(info.directory))]
  assert rows == [_ids(tokenizer, t) for t in texts]
  with pytest.raises(DataError, match=r"no column 'text' \(the columns are "
                     r"\['content', 'n'\]\)"):
    corpus.build_corpus(corpus.HfCorpus(dataset=ds), tokenizer,
                        str(tmp_path / "x"))
  # By name through load_dataset: the "json" builder on a local file.
  src = _write(tmp_path / "d.jsonl",
               "\n".join(json.dumps({"text": t}) for t in texts))
  by_name = corpus.build_corpus(
      corpus.HfCorpus("json", split="train", data_files={"train": src}),
      tokenizer, str(tmp_path / "named"), seq_len=16, packing="doc")
  assert [list(_content(r, by_name)) for r in
          _rows(corpus.Corpus(by_name.directory))] == rows


def _generated_corpus(path, megabytes, tokenizer, seed=0):
  words = np.array(sorted(w for w in tokenizer.get_vocab()
                          if w.isalpha() and len(w) > 2))
  rng = np.random.default_rng(seed)
  size = 0
  with open(path, "w") as f:
    while size < megabytes << 20:
      line = " ".join(rng.choice(words, rng.integers(5, 200))) + "\n"
      f.write(line)
      size += len(line)
  return str(path)


def test_tokenising_needs_bounded_memory(tmp_path, tokenizer):
  """Peak Python memory does not grow with the corpus (1 MB vs 4 MB)."""
  peaks, tokens = [], []
  for megabytes in (1, 4):
    src = _generated_corpus(tmp_path / f"{megabytes}.txt", megabytes,
                            tokenizer)
    tracemalloc.start()
    try:
      info = corpus.build_corpus(corpus.TextFiles(src), tokenizer,
                                 str(tmp_path / f"rows{megabytes}"),
                                 seq_len=128, chunk_chars=1 << 18)
      peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
      tracemalloc.stop()
    tokens.append(info.num_tokens)
  assert tokens[1] > 3.5 * tokens[0]
  # 256 Ki characters per tokenizer call: ~10 MB of Python objects at most
  # (measured 9.4 MB for both), while 4 MB of text is ~520k tokens.
  assert max(peaks) < 16 << 20
  assert peaks[1] < 1.25 * peaks[0]


def test_reader_resumes_at_the_same_example(wiki):
  _, c = wiki
  kwargs = dict(seed=3, process_index=0, process_count=1)
  it = c.iterator(16, **kwargs)
  run = [next(it) for _ in range(7)]
  it = c.iterator(16, **kwargs)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # Saved with the model.
  fresh = c.iterator(16, **kwargs)
  fresh.set_state(state)
  for expected in run[4:]:
    got = next(fresh)
    for k in ("input_ids", "attention_mask"):
      np.testing.assert_array_equal(got[k], expected[k])
  # Random access: the batch of step s, with no iterator at all.
  ds = c.dataset(16, **kwargs)
  np.testing.assert_array_equal(ds[5]["input_ids"], run[5]["input_ids"])


def test_reader_shuffles_by_seed_and_epoch(wiki):
  info, c = wiki
  n = info.num_rows
  ds = c.dataset(64, seed=0, process_index=0, process_count=1)
  all_rows = _rows(c)
  keys = {r.tobytes(): i for i, r in enumerate(all_rows)}
  assert len(keys) == n
  stream = [keys[r.tobytes()] for s in range(-(-2 * n // 64))
            for r in ds[s]["input_ids"]]
  first, second = stream[:n], stream[n:2 * n]
  # Each epoch is a permutation of all rows, and the two differ.
  assert sorted(first) == sorted(second) == list(range(n))
  assert first != list(range(n)) and first != second
  same = c.dataset(64, seed=0, process_index=0, process_count=1)
  other = c.dataset(64, seed=1, process_index=0, process_count=1)
  np.testing.assert_array_equal(same[3]["input_ids"], ds[3]["input_ids"])
  assert not np.array_equal(other[3]["input_ids"], ds[3]["input_ids"])
  assert (ds[0]["attention_mask"] == (ds[0]["input_ids"] != 0)).all()


def test_processes_share_the_global_batch(wiki):
  _, c = wiki
  whole = c.dataset(24, seed=1, process_index=0, process_count=1)
  parts = [c.dataset(24, seed=1, process_index=p, process_count=3)
           for p in range(3)]
  for step in (0, 1, 90, 200):  # 200 is past the first epoch (86 steps).
    glob = whole[step]["input_ids"]
    for p in range(3):
      assert parts[p][step]["input_ids"].shape == (8, 128)
      np.testing.assert_array_equal(parts[p][step]["input_ids"], glob[p::3])
  with pytest.raises(DataError, match="batch_size=24 does not divide over 5 "
                     "processes"):
    c.dataset(24, process_index=0, process_count=5)


def test_eval_reads_every_row_once_padded(wiki):
  info, c = wiki
  seen = []
  counts = []
  for p in range(2):
    batches = list(c.iterator(64, shuffle=False, num_epochs=1,
                              process_index=p, process_count=2))
    counts.append(len(batches))
    seen.append(np.concatenate([b["input_ids"] for b in batches]))
  assert counts[0] == counts[1] == -(-info.num_rows // 64)
  merged = np.empty((2 * len(seen[0]), 128), np.int32)
  merged[0::2], merged[1::2] = seen
  np.testing.assert_array_equal(merged[:info.num_rows], _rows(c))
  assert (merged[info.num_rows:] == info.pad_id).all()  # attention 0
