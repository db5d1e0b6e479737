"""CoNLL named-entity data: column files, TFDS and Hugging Face; sub-tokens.

Readers (each returns an `NerSplit` of sentences with IOB2 tags):

- `read_conll(path)`: CoNLL column files, one token per line (`token ...
  tag`: the first column is the token, the last the tag; POS and chunk
  columns in between are ignored), a blank line after each sentence,
  `-DOCSTART-` lines between documents, trailing spaces tolerated. A
  malformed line (one column, a column count unlike the file's first token
  line, invalid UTF-8) or a tag that is not IOB (`O`, `B-TYPE`, `I-TYPE`) or
  not in the given tag set raises a `DataError` naming the file and line.
- `load_conll_tfds(split)`: TFDS `conll2003`.
- `load_conll_hf(split, name)`: a Hugging Face CoNLL-2003 dataset.

Tags may be IOB1 (CoNLL-2003's original files: B- only between two
adjacent entities of one type) or IOB2 (every entity starts with B-); with
`scheme="auto"` an I- tag that starts an entity becomes B- (IOB1 -> IOB2,
the identity on IOB2), with `scheme="iob2"` it is an error.

`encode_sentences` tokenises pre-split words with a fast tokenizer and puts
each word's label on its first sub-token (the others get `ignore_index`,
or with `label_all_subtokens` the word's label with B- turned into I-);
`word_predictions` maps sub-token predictions back to words (the first
sub-token's), and `write_conll` writes `token gold pred` lines for conlleval.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re

import numpy as np

from research.data import errors
from research.data.errors import DataError

SCHEMES = ("auto", "iob2")
# CoNLL-2003's tags in the id order of TFDS and Hugging Face `conll2003`.
CONLL2003_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC",
                  "B-MISC", "I-MISC")
DOCSTART = "-DOCSTART-"
_TAG = re.compile(r"O|[BI]-\S+")

# Reasons a sentence can be dropped for (bad_rows="skip").
MALFORMED_LINE = "malformed line"
BAD_TAG = "bad tag"


@dataclasses.dataclass
class NerSplit:
  """The sentences of one file or split.

  Attributes:
    where: the file path or split description used in messages.
    unit: what `rows` counts: "line" (files) or "row" (datasets).
    tokens: one list of words per sentence.
    tags: the words' IOB2 tags, one list per sentence.
    rows: each sentence's first line (files, 1-based) or row (datasets).
    documents: each sentence's document index (files: counted by
      -DOCSTART- lines), or None when the source has no documents.
    label_names: the source's tag names in id order (TFDS, Hugging Face),
      else None.
    converted: tags changed from IOB1 to IOB2.
    skipped: sentences dropped under bad_rows="skip", by reason.
  """
  where: str
  unit: str
  tokens: list
  tags: list
  rows: list
  documents: list | None
  label_names: tuple | None
  converted: int
  skipped: dict

  @property
  def num_tokens(self) -> int:
    return sum(map(len, self.tokens))


def iob1_to_iob2(tags) -> list:
  """Turns each I-X that starts an entity into B-X (IOB2 is unchanged).

  An entity starts at an I-X after O, at the start of the sentence or after
  a tag of another type: IOB1 writes B-X only between two adjacent entities
  of type X, IOB2 at every entity start.
  """
  out = []
  previous = "O"
  for tag in tags:
    if tag.startswith("I-") and previous[2:] != tag[2:]:
      tag = "B-" + tag[2:]
    out.append(tag)
    previous = tag
  return out


def entity_types(tags) -> list:
  """The sorted entity types of IOB tags (lists of tags, or one list)."""
  flat = (t for sentence in tags for t in
          ([sentence] if isinstance(sentence, str) else sentence))
  return sorted({t[2:] for t in flat if t != "O"})


def iob2_tag_names(types) -> tuple:
  """("O", "B-T1", "I-T1", "B-T2", ...) for the given entity types, in order."""
  return ("O",) + tuple(f"{p}-{t}" for t in types for p in "BI")


def check_tags(tags, scheme: str = "auto", tag_set=None):
  """The first bad tag of a sentence as (index, reason detail), or None.

  Args:
    tags: the sentence's tags as written.
    scheme: "auto" (IOB1 or IOB2) or "iob2" (an I- tag may not start an
      entity).
    tag_set: the allowed tags, or None for any IOB tag.
  """
  previous = "O"
  for i, tag in enumerate(tags):
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
      return i, f"tag {tag!r} is not an IOB tag (O, B-TYPE or I-TYPE)"
    if tag_set is not None and tag not in tag_set:
      return i, f"tag {tag!r} is not in the tag set {sorted(tag_set)}"
    if scheme == "iob2" and tag.startswith("I-") and previous[2:] != tag[2:]:
      return i, (f"{tag} follows {previous}: not IOB2 (an entity starts "
                 "with B-); read IOB1 data with scheme='auto'")
    previous = tag
  return None


class _Sentences:
  """Checks and converts sentences; keeps the good ones (RowPolicy)."""

  def __init__(self, policy, scheme, tag_set):
    if scheme not in SCHEMES:
      raise DataError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    self.policy = policy
    self.scheme = scheme
    self.tag_set = None if tag_set is None else frozenset(tag_set)
    self.tokens, self.tags, self.rows, self.documents = [], [], [], []
    self.converted = 0

  def bad_tag(self, tags, rows):
    """The first bad tag as (row, reason detail), or None."""
    bad = check_tags(tags, self.scheme, self.tag_set)
    return None if bad is None else (rows[bad[0]], bad[1])

  def add(self, tokens, tags, rows, document):
    """Checks one sentence (rows: each token's line or row number)."""
    bad = self.bad_tag(tags, rows)
    if bad:
      return self.policy.bad(bad[0], BAD_TAG, bad[1])
    converted = iob1_to_iob2(tags)
    self.converted += sum(a != b for a, b in zip(tags, converted))
    self.tokens.append(list(tokens))
    self.tags.append(converted)
    self.rows.append(rows[0])
    self.documents.append(document)

  def result(self, unit, documents=True, label_names=None):
    return NerSplit(
        where=self.policy.where, unit=unit, tokens=self.tokens,
        tags=self.tags, rows=self.rows,
        documents=self.documents if documents else None,
        label_names=label_names, converted=self.converted,
        skipped=dict(self.policy.counts))


def read_conll(path: str, *, scheme: str = "auto", tag_set=None,
               bad_rows: str = "error") -> NerSplit:
  """Reads a CoNLL column file.

  Args:
    path: the file (e.g. CoNLL-2003 eng.train / train.txt).
    scheme: "auto" (IOB1 or IOB2, converted to IOB2) or "iob2" (an I- tag
      that starts an entity is an error).
    tag_set: the allowed tags (as written in the file), or None for any
      IOB tag.
    bad_rows: "error" raises at the first bad line; "skip" drops the
      sentence that holds it.

  Returns:
    An `NerSplit` (rows: the first line of each sentence).

  Raises:
    DataError: naming the file and line.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  with open(path, "rb") as f:
    lines = f.read().removeprefix(b"\xef\xbb\xbf").split(b"\n")
  policy = errors.RowPolicy(bad_rows, path, "line")
  out = _Sentences(policy, scheme, tag_set)
  columns = None
  document, document_used = 0, False
  tokens, tags, rows, broken = [], [], [], False

  def end_sentence():
    nonlocal tokens, tags, rows, broken, document_used
    if tokens and not broken:
      out.add(tokens, tags, rows, document)
    document_used |= bool(tokens) or broken
    tokens, tags, rows, broken = [], [], [], False

  def bad_line(number, reason, detail):
    nonlocal broken
    if not broken:  # One report (and one skip count) per sentence.
      policy.bad(number, reason, detail)
    broken = True

  for number, raw in enumerate(lines, 1):
    try:
      fields = raw.decode("utf-8").split()
    except UnicodeDecodeError as e:
      bad_line(number, errors.INVALID_UTF8,
               f"not valid UTF-8 ({e.reason} at byte {e.start})")
      continue
    if not fields:
      end_sentence()
      continue
    if fields[0] == DOCSTART:
      end_sentence()
      if document_used:  # Documents are numbered from 0 by their sentences.
        document, document_used = document + 1, False
      continue
    columns = columns or len(fields)
    if len(fields) < 2 or len(fields) != columns:
      expected = ("at least 2 (token ... tag)" if len(fields) < 2 else
                  f"{columns} like the file's first token line")
      bad_line(number, MALFORMED_LINE,
               f"{len(fields)} column(s) where {expected} are expected: "
               f"{' '.join(fields)!r}")
      continue
    tokens.append(fields[0])
    tags.append(fields[-1])
    rows.append(number)
  end_sentence()
  if not out.tokens:
    raise DataError(f"{path}: no sentences" + (
        f" (skipped: {dict(policy.counts)})" if policy.counts else ""))
  return out.result("line")


def _class_names(feature):
  """The names of a Sequence(ClassLabel) feature (TFDS or datasets), or None."""
  inner = getattr(feature, "feature", feature)
  names = getattr(inner, "names", None)
  return tuple(names) if names else None


def _decode(value):
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _sentence_rows(out, where, row_tokens, row_tags, names):
  """Adds dataset rows (lists of tokens and tag ids or names)."""
  for row, (tokens, tags) in enumerate(zip(row_tokens, row_tags), 1):
    tokens = [_decode(t) for t in tokens]
    if len(tokens) != len(tags):
      out.policy.bad(row, MALFORMED_LINE, f"{len(tokens)} tokens but "
                     f"{len(tags)} tags")
      continue
    if not tokens:
      continue
    tag_names = []
    for tag in tags:
      if isinstance(tag, (str, bytes)):
        tag_names.append(_decode(tag))
      elif names is not None and 0 <= int(tag) < len(names):
        tag_names.append(names[int(tag)])
      else:
        raise DataError(f"{where}, row {row}: tag id {tag!r} has no name "
                        "(pass label_names)")
    out.add(tokens, tag_names, [row] * len(tokens), None)


def load_conll_tfds(split: str, name: str = "conll2003", *,
                    data_dir: str | None = None, scheme: str = "auto",
                    bad_rows: str = "error") -> NerSplit:
  """Loads a TFDS CoNLL split (`conll2003`: train, validation, test).

  Args:
    split: the split name.
    name: the TFDS name.
    data_dir: the TFDS data directory (None: its default).
    scheme: as in `read_conll`.
    bad_rows: as in `read_conll`.

  Returns:
    An `NerSplit` with the `ner` feature's names as label_names and no
    documents (TFDS drops the -DOCSTART- lines).
  """
  import tensorflow_datasets as tfds  # Heavy; only when this source is used.
  where = f"tfds {name} split {split!r}"
  try:
    ds, info = tfds.load(name, split=split, data_dir=data_dir, with_info=True)
  except Exception as e:  # Unknown name or split, no network: say which.
    raise DataError(f"{where}: cannot load ({e})") from e
  names = _class_names(info.features["ner"])
  out = _Sentences(errors.RowPolicy(bad_rows, where, "row"), scheme, names)
  rows = list(tfds.as_numpy(ds))
  _sentence_rows(out, where, (r["tokens"] for r in rows),
                 ([int(t) for t in r["ner"]] for r in rows), names)
  return out.result("row", documents=False, label_names=names)


def load_conll_hf(split: str, name: str = "eriktks/conll2003", *,
                  config: str | None = None, revision: str | None = None,
                  cache_dir: str | None = None, token_column: str = "tokens",
                  tag_column: str = "ner_tags", label_names=None,
                  scheme: str = "auto", bad_rows: str = "error") -> NerSplit:
  """Loads a Hugging Face CoNLL split.

  `datasets` 4+ no longer runs loading scripts, and `eriktks/conll2003` (the
  former `conll2003`) is one: use its parquet conversion
  (`revision="refs/convert/parquet"`) or a parquet copy. Mirrors differ in
  their tag id order; the names come from the ClassLabel feature, or from
  `label_names` when the tags are plain ids.

  Args:
    split: the split name.
    name: the dataset name on the hub.
    config: the dataset config, if any.
    revision: the hub revision (branch, tag or commit).
    cache_dir: the Hugging Face cache directory (None: its default).
    token_column, tag_column: the columns of words and tags.
    label_names: the tag names in id order, when the dataset has none.
    scheme: as in `read_conll`.
    bad_rows: as in `read_conll`.

  Returns:
    An `NerSplit` with no documents.
  """
  import datasets  # Heavy; only when this source is used.
  where = f"hf {name} split {split!r}"
  try:
    ds = datasets.load_dataset(name, config, split=split, revision=revision,
                               cache_dir=cache_dir)
  except Exception as e:
    hint = (" (a loading script: try revision='refs/convert/parquet')"
            if "script" in str(e).lower() else "")
    raise DataError(f"{where}: cannot load ({e}){hint}") from e
  for column in (token_column, tag_column):
    if column not in ds.column_names:
      raise DataError(f"{where}: no column {column!r}; the columns are "
                      f"{ds.column_names}")
  names = _class_names(ds.features[tag_column]) or (
      tuple(label_names) if label_names else None)
  out = _Sentences(errors.RowPolicy(bad_rows, where, "row"), scheme, names)
  columns = ds.select_columns([token_column, tag_column]).to_dict()
  _sentence_rows(out, where, columns[token_column], columns[tag_column], names)
  return out.result("row", documents=False, label_names=names)


def write_conll(path: str, tokens, gold, predicted) -> None:
  """Writes `token gold predicted` lines, a blank line after each sentence.

  The input format of conlleval (`conlleval < path`); with `gold=None`
  (unlabeled data) `token predicted` lines.

  Raises:
    ValueError: a sentence whose lists differ in length, or a token that
      contains whitespace (it would shift the columns).
  """
  gold = [None] * len(tokens) if gold is None else gold
  with open(path, "w", encoding="utf-8") as f:
    for i, (words, g, p) in enumerate(zip(tokens, gold, predicted)):
      g = [None] * len(words) if g is None else g
      if len({len(words), len(g), len(p)}) != 1:
        raise ValueError(f"sentence {i}: {len(words)} tokens, {len(g)} gold "
                         f"and {len(p)} predicted tags")
      for token, gt, pt in zip(words, g, p):
        if not token or any(ch.isspace() for ch in token):
          raise ValueError(f"sentence {i}: token {token!r} is empty or "
                           "contains whitespace")
        f.write(f"{token} {pt}\n" if gt is None else f"{token} {gt} {pt}\n")
      f.write("\n")


class ConllFile:
  """A CoNLL column file as a data source of the training pipeline.

  `research.tasks.token_classification` reads `data.train_file` /
  `data.eval_file` through it (`data.format="conll"`, or "auto" and a
  .txt / .conll / .iob file): `read` gives the `sources.RawSplit` of word
  lists and JSON tag lists that every source gives, so the task featurises
  CoNLL files, JSON lines, TFDS and Hugging Face rows alike. Rows are each
  sentence's first line; errors name the file and the line itself.

  Args:
    path: the file.
    scheme: as in `read_conll`.
    tag_set: the allowed tags (e.g. `data.label_names`), or None.
  """

  def __init__(self, path, scheme="auto", tag_set=None):
    self.path = path
    self.scheme = scheme
    self.tag_set = tuple(tag_set) if tag_set else None

  def identity(self):
    """What the tokenisation cache is keyed on: path, content, checks."""
    from research.data import sources  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(self.path):
      raise DataError(f"{self.path}: no such file")
    return {"source": "conll", "path": os.path.abspath(self.path),
            "sha256": sources.file_sha256(self.path), "scheme": self.scheme,
            "tag_set": self.tag_set}

  def read(self, text_fields, label_field, bad_rows, require_labels,
           words=True, label_json=True):
    """The file's sentences as a `RawSplit` (see `sources.LocalFile.read`)."""
    del text_fields, label_field, require_labels, words, label_json
    import json  # pylint: disable=import-outside-toplevel
    from research.data import sources  # pylint: disable=import-outside-toplevel
    split = read_conll(self.path, scheme=self.scheme, tag_set=self.tag_set,
                       bad_rows=bad_rows)
    return sources.RawSplit(
        where=split.where, unit=split.unit, texts=[split.tokens],
        labels=[json.dumps(t) for t in split.tags], rows=split.rows,
        skipped=split.skipped, label_names=None)


# --- Sub-tokens ------------------------------------------------------------------


def align_tags(word_ids, word_tags, *, label_all_subtokens: bool = False,
               ignore: str = "") -> list:
  """Word tags -> one tag per sub-token (`ignore` where the loss skips it).

  Args:
    word_ids: each sub-token's word index, None (or -1) for special tokens
      (the tokenizer's `word_ids()`).
    word_tags: the words' IOB2 tags.
    label_all_subtokens: tag a word's later sub-tokens too (B-X -> I-X, so
      entities stay well formed, as Hugging Face's run_ner); else they get
      `ignore`.
    ignore: the tag of skipped sub-tokens.

  Returns:
    A list of len(word_ids) tags.
  """
  out, previous = [], None
  for word in word_ids:
    if word is None or word < 0:
      out.append(ignore)
      previous = None
      continue
    tag = word_tags[word]
    if word == previous:
      tag = (("I-" + tag[2:] if tag.startswith("B-") else tag)
             if label_all_subtokens else ignore)
    out.append(tag)
    previous = word
  return out


def align_labels(word_ids, word_tags, label_to_id, *,
                 label_all_subtokens: bool = False,
                 ignore_index: int = -100) -> np.ndarray:
  """Word tags -> one label id per sub-token (`align_tags`, then ids).

  Args:
    word_ids: each sub-token's word index, None for special tokens (the
      tokenizer's `word_ids()`).
    word_tags: the words' IOB2 tags.
    label_to_id: tag -> label id.
    label_all_subtokens: see `align_tags`.
    ignore_index: the label the loss skips.

  Returns:
    int32 [len(word_ids)].
  """
  tags = align_tags(word_ids, word_tags,
                    label_all_subtokens=label_all_subtokens, ignore=None)
  try:
    return np.asarray([ignore_index if t is None else label_to_id[t]
                       for t in tags], np.int32)
  except KeyError as e:
    raise DataError(f"tag {e.args[0]!r} is not in the label set "
                    f"{sorted(label_to_id)}") from None


def tokenize_words(tokenizer, tokens, *, max_length: int = 128,
                   chunk: int = 4096):
  """Yields (input_ids, word_ids) of each pre-split sentence, truncated.

  Args:
    tokenizer: a Hugging Face fast tokenizer.
    tokens: one list of words per sentence.
    max_length: the most sub-tokens per sentence, special tokens included.
    chunk: sentences per tokenizer call.

  Yields:
    (list of ids, list of word indices with -1 for special tokens).
  """
  if not getattr(tokenizer, "is_fast", False):
    raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; "
                    "word alignment needs its word_ids()")
  for first in range(0, len(tokens), chunk):
    enc = tokenizer(tokens[first:first + chunk], is_split_into_words=True,
                    truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False)
    for j, input_ids in enumerate(enc["input_ids"]):
      yield input_ids, [-1 if w is None else w for w in enc.word_ids(j)]


def word_predictions(word_ids, token_predictions, num_words: int, *,
                     fill=None) -> list:
  """Sub-token predictions -> one per word: its first sub-token's.

  Args:
    word_ids: each sub-token's word index, None (or -1) for special tokens.
    token_predictions: one prediction per sub-token.
    num_words: the sentence's words.
    fill: the prediction of a word without sub-tokens (cut by truncation).

  Returns:
    A list of num_words predictions.
  """
  out = [fill] * num_words
  seen = [False] * num_words
  for word, prediction in zip(word_ids, token_predictions):
    if word is None or word < 0 or seen[word]:
      continue
    out[word] = prediction
    seen[word] = True
  return out


@dataclasses.dataclass
class EncodedSentences:
  """Tokenised sentences, flat like the token cache.

  Sentence i is tokens `offsets[i]:offsets[i + 1]`.

  Attributes:
    input_ids: int32 [T].
    token_type_ids: int8 [T] (zeros: single sequences).
    labels: int32 [T], ignore_index where the loss skips a token.
    word_ids: int32 [T], each token's word in its sentence, -1 for special
      tokens.
    offsets: int64 [n + 1].
    num_words: int32 [n], words per sentence.
    truncated: sentences that lost words to max_length.
  """
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  labels: np.ndarray
  word_ids: np.ndarray
  offsets: np.ndarray
  num_words: np.ndarray
  truncated: int

  def word_tags(self, token_predictions, label_names, fill="O") -> list:
    """Flat sub-token label ids [T] -> each sentence's word tags."""
    token_predictions = np.asarray(token_predictions)
    out = []
    for i, words in enumerate(self.num_words):
      part = slice(self.offsets[i], self.offsets[i + 1])
      out.append([label_names[p] if p is not None else fill
                  for p in word_predictions(self.word_ids[part],
                                            token_predictions[part].tolist(),
                                            int(words))])
    return out


def encode_sentences(tokenizer, tokens, tags, label_names, *,
                     max_length: int = 128, label_all_subtokens: bool = False,
                     ignore_index: int = -100,
                     chunk: int = 4096) -> EncodedSentences:
  """Tokenises pre-split sentences and aligns their labels (see module doc).

  Args:
    tokenizer: a Hugging Face fast tokenizer.
    tokens: one list of words per sentence.
    tags: their IOB2 tags (None for unlabeled sentences: labels all ignored).
    label_names: the tags in label id order.
    max_length: the most sub-tokens per sentence, special tokens included.
    label_all_subtokens: see `align_labels`.
    ignore_index: see `align_labels`.
    chunk: sentences per tokenizer call.

  Returns:
    `EncodedSentences`.
  """
  label_to_id = {name: i for i, name in enumerate(label_names)}
  ids, labels, words, lengths = [], [], [], []
  truncated = 0
  pieces = tokenize_words(tokenizer, tokens, max_length=max_length,
                          chunk=chunk)
  for i, (input_ids, word_ids) in enumerate(pieces):
    kept = [w for w in word_ids if w >= 0]
    truncated += bool(kept) and kept[-1] < len(tokens[i]) - 1
    if tags is None:
      labels.append(np.full(len(word_ids), ignore_index, np.int32))
    else:
      labels.append(align_labels(
          word_ids, tags[i], label_to_id,
          label_all_subtokens=label_all_subtokens, ignore_index=ignore_index))
    ids.append(input_ids)
    words.append(word_ids)
    lengths.append(len(input_ids))
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  total = int(offsets[-1])
  return EncodedSentences(
      input_ids=np.fromiter(itertools.chain.from_iterable(ids), np.int32,
                            count=total),
      token_type_ids=np.zeros(total, np.int8),
      labels=(np.concatenate(labels) if labels else np.zeros(0, np.int32)),
      word_ids=np.fromiter(itertools.chain.from_iterable(words), np.int32,
                           count=total),
      offsets=offsets,
      num_words=np.asarray([len(s) for s in tokens], np.int32),
      truncated=int(truncated))
