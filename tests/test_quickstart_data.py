"""Checks that the packaged quickstart dataset parses and stays sound."""

import collections
import pathlib

import pytest

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "quickstart"
LABELS = {"positive", "negative"}


def read_tsv(path):
  """Returns the (sentence, label) rows of `path`, checking its layout."""
  lines = path.read_text(encoding="utf-8").splitlines()
  assert lines, f"{path} is empty"
  assert lines[0] == "sentence\tlabel", f"{path}: bad header {lines[0]!r}"
  rows = []
  for number, line in enumerate(lines[1:], start=2):
    fields = line.split("\t")
    assert len(fields) == 2, f"{path}:{number}: {len(fields)} columns"
    sentence, label = fields
    assert sentence.strip() == sentence and sentence, f"{path}:{number}"
    assert label in LABELS, f"{path}:{number}: label {label!r}"
    rows.append((sentence, label))
  return rows


@pytest.fixture(scope="module")
def splits():
  return {name: read_tsv(DATA / f"{name}.tsv") for name in ("train", "dev")}


def test_counts_and_balance(splits):
  assert 300 <= len(splits["train"]) <= 340
  assert 90 <= len(splits["dev"]) <= 110
  for rows in splits.values():
    counts = collections.Counter(label for _, label in rows)
    assert set(counts) == LABELS
  dev_counts = collections.Counter(label for _, label in splits["dev"])
  assert max(dev_counts.values()) / len(splits["dev"]) < 0.6


def test_no_duplicates_or_overlap(splits):
  train = [s.lower() for s, _ in splits["train"]]
  dev = [s.lower() for s, _ in splits["dev"]]
  assert len(set(train)) == len(train)
  assert len(set(dev)) == len(dev)
  assert not set(train) & set(dev)


def test_sentence_lengths(splits):
  for rows in splits.values():
    for sentence, _ in rows:
      assert 3 <= len(sentence.split()) <= 40, sentence
