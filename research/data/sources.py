"""Readers for the three data sources: local files, TFDS and Hugging Face.

Each source is one split of one dataset. It has an `identity()` (what the
tokenisation cache is keyed on) and `read()`, which returns a `RawSplit`: the
texts and raw labels of the rows that passed the bad-row checks. Labels stay
strings here; `research.data.labels` turns them into ids (or floats) once the
label set is known, so that the cache does not depend on it.

Two options serve tasks beyond sentence classification (`research.tasks`):
`words=True` reads each text column as pre-split words (a list of strings; a
plain text is split on whitespace), and `label_json=True` keeps a structured
label (a list of tags, SQuAD's `answers` dict) as its JSON text, ClassLabel
ids given by their names.
"""

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import logging
import math
import os

from research.data import errors
from research.data.errors import DataError

FORMATS = ("csv", "tsv", "jsonl")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}

# Raw label of a row that has none (GLUE test splits): kept, never an error in
# an evaluation split.
UNLABELED = "-1"


@dataclasses.dataclass
class RawSplit:
  """The rows of one split that passed the checks, before tokenisation.

  Attributes:
    where: the file path or dataset description used in messages.
    unit: what `rows` counts: "line" (files) or "row" (datasets).
    texts: one list per text field, all of the same length: strings, or
      lists of words (`words=True`).
    labels: the raw labels as strings ("-1": unlabeled), or None when the
      split has no label column at all.
    rows: the 1-based line (files) or example (datasets) number of each row.
    skipped: rows dropped under data.bad_rows="skip", by reason.
    label_names: the source's own label names in id order (a TFDS or Hugging
      Face ClassLabel), else None.
  """
  where: str
  unit: str
  texts: list
  labels: list | None
  rows: list
  skipped: dict
  label_names: tuple | None = None


def file_sha256(path):
  """Returns the hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def label_str(value):
  """Returns a raw label as a string; None when it is missing.

  Integral floats become "3" rather than "3.0": a pandas-read integer column
  with a gap is float, and its labels must still look like ids.
  """
  if value is None:
    return None
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    if math.isnan(value):
      return None
    return str(int(value)) if value.is_integer() else repr(value)
  if isinstance(value, bytes):
    value = value.decode("utf-8", "surrogateescape")
  return str(value).strip()


def plain(value):
  """A value as plain Python: bytes decoded, numpy arrays and scalars unboxed.

  TFDS yields numpy arrays of bytes, Hugging Face lists and dicts; JSON
  labels and word lists need the same plain form from every source.
  """
  if isinstance(value, bytes):
    return value.decode("utf-8", "surrogateescape")
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and
                                          getattr(value, "ndim", 0) > 0):
    return [plain(v) for v in value]
  if hasattr(value, "item"):  # a numpy scalar
    return plain(value.item())
  return value


def _class_names(feature):
  """A ClassLabel's names, also inside a sequence feature; else None."""
  for f in (feature, getattr(feature, "feature", None)):
    names = getattr(f, "names", None)
    if names:
      return tuple(names)
  return None


def json_label(value, names=None):
  """A structured label as JSON text; None when missing.

  Integers in a list become `names[i]` (a sequence of ClassLabels).
  """
  value = plain(value)
  if value is None or value == "":
    return None
  if names is not None and isinstance(value, list):
    value = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v
             for v in value]
  return json.dumps(value, ensure_ascii=False)


def _valid_utf8(s):
  # Undecodable bytes were kept as lone surrogates (surrogateescape).
  try:
    s.encode("utf-8")
    return True
  except UnicodeEncodeError:
    return False


class _Collector:
  """Checks rows against the bad-row rules and keeps the good ones."""

  def __init__(self, policy, text_fields, labeled, words=False):
    self.policy = policy
    self.text_fields = text_fields
    self.labeled = labeled
    self.words = words
    self.texts = [[] for _ in text_fields]
    self.labels = [] if labeled else None
    self.rows = []

  def _text_problem(self, field, text):
    """(reason, detail) if `text` is not a usable text, else None."""
    if text is None:
      return errors.EMPTY_TEXT, f"column {field!r} has no text"
    if not isinstance(text, str):
      return errors.EMPTY_TEXT, (f"column {field!r} is {type(text).__name__}, "
                                 "not text")
    if not _valid_utf8(text):
      return errors.INVALID_UTF8, f"column {field!r} is not valid UTF-8"
    if "\0" in text:
      # The tokenizer would silently drop it; in a text file it means binary
      # or UTF-16 data, not a sentence.
      return errors.NUL_BYTE, f"column {field!r} contains a NUL byte"
    if not text.strip():
      return errors.EMPTY_TEXT, f"column {field!r} is empty or whitespace-only"
    return None

  def add(self, row, texts, label):
    """Keeps the row if its texts and label are usable (else policy.bad)."""
    if self.words:
      # A plain text where words are expected: whitespace-separated words.
      texts = [t.split() if isinstance(t, str) else plain(t) for t in texts]
    for field, text in zip(self.text_fields, texts):
      if self.words and isinstance(text, list):
        if not text:
          return self.policy.bad(row, errors.EMPTY_TEXT,
                                 f"column {field!r} has no words")
        problems = (self._text_problem(f"{field}[{i}]", w)
                    for i, w in enumerate(text))
        problem = next((p for p in problems if p), None)
      else:
        problem = self._text_problem(field, text)
      if problem:
        return self.policy.bad(row, *problem)
    if self.labeled:
      if label is None or label == "":
        return self.policy.bad(row, errors.MISSING_LABEL, "the label is missing")
      if not _valid_utf8(label):
        return self.policy.bad(row, errors.INVALID_UTF8,
                               "the label is not valid UTF-8")
      self.labels.append(label)
    for column, text in zip(self.texts, texts):
      column.append(text)
    self.rows.append(row)

  def result(self, where, unit, label_names=None):
    return RawSplit(where=where, unit=unit, texts=self.texts,
                    labels=self.labels, rows=self.rows,
                    skipped=dict(self.policy.counts), label_names=label_names)


def _check_columns(where, columns, text_fields, label_field, require_labels):
  """Raises for a missing text column; returns whether labels are present."""
  for field in text_fields:
    if field not in columns:
      raise DataError(f"{where}: no text column {field!r}; the columns are "
                      f"{list(columns)} (see data.text_fields)")
  if not label_field:
    return False
  if label_field in columns:
    return True
  if require_labels:
    raise DataError(f"{where}: no label column {label_field!r}; the columns "
                    f"are {list(columns)} (see data.label_field)")
  logging.info("%s has no column %r: unlabeled split (labels -1).", where,
               label_field)
  return False


class LocalFile:
  """One CSV, TSV or JSON-lines file.

  Files are read as bytes and decoded with "surrogateescape", so an invalid
  byte stays inside its own row and is reported with that row's line number.
  TSV follows GLUE: one row per line, no quoting. CSV follows RFC 4180 (quoted
  fields may span lines; a row is numbered by its first line). Empty lines are
  ignored.

  Args:
    path: the file.
    fmt: "auto" (by extension), "csv", "tsv" or "jsonl".
  """

  def __init__(self, path, fmt="auto"):
    self.path = path
    self.fmt = self._format(path, fmt)

  @staticmethod
  def _format(path, fmt):
    if fmt != "auto":
      if fmt not in FORMATS:
        raise DataError(f"data.format must be 'auto' or one of {FORMATS}, "
                        f"got {fmt!r}")
      return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
      raise DataError(f"{path}: cannot tell the format from the extension "
                      f"{ext!r}; use one of {sorted(_EXTENSIONS)} or set "
                      f"data.format to one of {FORMATS}")
    return _EXTENSIONS[ext]

  def _check_exists(self):
    if not os.path.isfile(self.path):
      raise DataError(f"{self.path}: no such file")

  def identity(self):
    """Returns what the cache key is built from: path, format, content."""
    self._check_exists()
    return {"source": "local", "path": os.path.abspath(self.path),
            "format": self.fmt, "sha256": file_sha256(self.path)}

  def read(self, text_fields, label_field, bad_rows, require_labels,
           words=False, label_json=False):
    """Reads and checks the rows.

    Args:
      text_fields: one or two column names.
      label_field: the label column ("" for none).
      bad_rows: "error" or "skip".
      require_labels: a missing label column is an error (training splits);
        otherwise the split is read as unlabeled.
      words: the text columns hold lists of words (see the module docstring).
      label_json: keep structured labels as JSON text.

    Returns:
      A `RawSplit`.

    Raises:
      DataError: a missing file or column, or a bad row under "error".
    """
    self._check_exists()
    with open(self.path, "rb") as f:
      text = f.read().decode("utf-8", "surrogateescape")
    text = text.removeprefix("\ufeff")
    policy = errors.RowPolicy(bad_rows, self.path, "line")
    if self.fmt == "jsonl":
      columns, records = self._jsonl(text, policy)
    else:
      columns, records = self._delimited(text, policy)
    labeled = _check_columns(self.path, columns, text_fields, label_field,
                             require_labels)
    out = _Collector(policy, text_fields, labeled, words)
    to_label = json_label if label_json else label_str
    for line, record in records:
      if record is None:
        continue  # Already reported (ragged row, invalid JSON).
      out.add(line, [record.get(f) for f in text_fields],
              to_label(record.get(label_field)) if labeled else None)
    return out.result(self.path, "line")

  def _delimited(self, text, policy):
    if self.fmt == "tsv":
      lines = text.split("\n")
      rows = ((i + 1, line.removesuffix("\r").split("\t"))
              for i, line in enumerate(lines) if line.removesuffix("\r"))
    else:
      rows = self._csv_rows(text)
    rows = iter(rows)
    try:
      _, header = next(rows)
    except StopIteration:
      raise DataError(f"{self.path}: the file is empty (expected a header "
                      "line)") from None
    columns = [c.strip() for c in header]

    def records():
      for line, values in rows:
        if len(values) != len(columns):
          policy.bad(line, errors.RAGGED_ROW,
                     f"{len(values)} fields where the header has "
                     f"{len(columns)}")
          yield line, None
        else:
          yield line, dict(zip(columns, values))

    return columns, records()

  def _csv_rows(self, text):
    # The csv module refuses fields over 128 KiB by default; a long document
    # is data (truncated to max_length later), not a malformed file.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(io.StringIO(text, newline=""))
    first_line = 1
    try:
      for values in reader:
        if values:
          yield first_line, values
        first_line = reader.line_num + 1
    except csv.Error as e:
      raise DataError(f"{self.path}, line {first_line}: malformed CSV "
                      f"({e})") from None

  def _jsonl(self, text, policy):
    records = []
    columns = None
    for i, line in enumerate(text.split("\n")):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        policy.bad(i + 1, errors.INVALID_JSON, f"invalid JSON ({e.msg})")
        continue
      if not isinstance(record, dict):
        policy.bad(i + 1, errors.INVALID_JSON,
                   "expected one JSON object per line")
        continue
      if columns is None:
        columns = list(record)
      records.append((i + 1, record))
    if columns is None:
      raise DataError(f"{self.path}: no JSON objects in the file")
    return columns, records


class TfdsSplit:
  """One split of a TensorFlow Datasets dataset ("glue/sst2", "validation").

  Text features are bytes and are decoded as UTF-8 per row. A ClassLabel's
  ids become its names; -1 (GLUE test splits) stays "-1", i.e. unlabeled.
  """

  def __init__(self, name, split, data_dir=""):
    self.name = name
    self.split = split
    self.data_dir = data_dir or None
    self.where = f"tfds {name} split {split!r}"

  def identity(self):
    """Returns what the cache key is built from: name, version, split."""
    import tensorflow_datasets as tfds  # Heavy; only when this source is used.
    try:
      version = str(tfds.builder(self.name, data_dir=self.data_dir).version)
    except Exception as e:  # Unknown name, bad config: say which dataset.
      # TFDS lists every dataset it knows (thousands of lines): keep the
      # first line and offer the close names instead.
      near = difflib.get_close_matches(self.name.split("/")[0],
                                       _tfds_names(tfds), n=3)
      hint = f"; close names: {', '.join(near)}" if near else ""
      raise DataError(f"{self.where}: cannot open the dataset "
                      f"(config.data.name={self.name!r}: "
                      f"{str(e).splitlines()[0]}){hint}") from e
    return {"source": "tfds", "name": self.name, "version": version,
            "split": self.split, "data_dir": self.data_dir}

  def read(self, text_fields, label_field, bad_rows, require_labels,
           words=False, label_json=False):
    """Reads and checks the rows; see `LocalFile.read`."""
    import tensorflow_datasets as tfds
    try:
      ds, info = tfds.load(self.name, split=self.split, data_dir=self.data_dir,
                           with_info=True)
    except Exception as e:
      raise DataError(f"{self.where}: cannot load ({e})") from e
    features = info.features
    labeled = _check_columns(self.where, list(features.keys()), text_fields,
                             label_field, require_labels)
    names = _class_names(features[label_field]) if labeled else None
    policy = errors.RowPolicy(bad_rows, self.where, "row")
    out = _Collector(policy, text_fields, labeled, words)
    if words or label_json:
      # Ragged features (word lists, answers) do not batch: row by row.
      for row, example in enumerate(tfds.as_numpy(ds), start=1):
        label = (json_label(example[label_field], names)
                 if labeled and label_json else
                 _class_name(plain(example[label_field]), names)
                 if labeled else None)
        out.add(row, [plain(example[f]) for f in text_fields], label)
      return out.result(self.where, "row", names)
    row = 0
    for batch in tfds.as_numpy(ds.batch(1024)):
      for i in range(len(batch[text_fields[0]])):
        row += 1
        texts = [batch[f][i].decode("utf-8", "surrogateescape")
                 for f in text_fields]
        label = None
        if labeled:
          label = _class_name(batch[label_field][i].item(), names)
        out.add(row, texts, label)
    return out.result(self.where, "row", names)


def _tfds_names(tfds):
  try:
    return tfds.list_builders(with_community_datasets=False)  # no network
  except Exception:  # pylint: disable=broad-except
    return []  # Only for a hint in an error message.


def _class_name(value, names):
  """A ClassLabel id as its name; -1 and anything else as label_str."""
  if names is not None and isinstance(value, int) and 0 <= value < len(names):
    return names[value]
  return label_str(value)


class HfSplit:
  """One split of a Hugging Face dataset (`datasets.load_dataset`).

  Args:
    name: the dataset ("nyu-mll/glue", or a builder such as "csv").
    config: the dataset config ("sst2"), or "" for none.
    split: the split name.
    data_files: optional {split: path} passed to `load_dataset` (local files
      through the "csv"/"json" builders).
    cache_dir: the Hugging Face cache directory ("" = its default).
  """

  def __init__(self, name, config, split, data_files=None, cache_dir=""):
    self.name = name
    self.config = config or None
    self.split = split
    self.data_files = data_files or None
    self.cache_dir = cache_dir or None
    self.where = f"hf {name}" + (f"/{config}" if config else "") + \
        f" split {split!r}"
    self._dataset = None

  def _load(self):
    if self._dataset is None:
      import datasets  # Heavy; only when this source is used.
      for path in (self.data_files or {}).values():
        if not os.path.isfile(path):
          raise DataError(f"{self.where}: no such file {path}")
      try:
        self._dataset = datasets.load_dataset(
            self.name, self.config, split=self.split,
            data_files=self.data_files, cache_dir=self.cache_dir)
      except Exception as e:
        raise DataError(f"{self.where}: cannot load (config.data.name="
                        f"{self.name!r}: {e})") from e
    return self._dataset

  def identity(self):
    """Returns what the cache key is built from: name, files, fingerprint."""
    files = {k: [os.path.abspath(v), file_sha256(v)]
             for k, v in (self.data_files or {}).items()}
    return {"source": "hf", "name": self.name, "config": self.config,
            "split": self.split, "data_files": files,
            "fingerprint": self._load()._fingerprint}

  def read(self, text_fields, label_field, bad_rows, require_labels,
           words=False, label_json=False):
    """Reads and checks the rows; see `LocalFile.read`."""
    ds = self._load()
    labeled = _check_columns(self.where, ds.column_names, text_fields,
                             label_field, require_labels)
    names = _class_names(ds.features[label_field]) if labeled else None
    columns = ds.select_columns(
        list(text_fields) + ([label_field] if labeled else [])).to_dict()
    policy = errors.RowPolicy(bad_rows, self.where, "row")
    out = _Collector(policy, text_fields, labeled, words)
    for i in range(ds.num_rows):
      texts = [columns[f][i] for f in text_fields]
      label = None
      if labeled:
        label = (json_label(columns[label_field][i], names) if label_json
                 else _class_name(columns[label_field][i], names))
      out.add(i + 1, texts, label)
    return out.result(self.where, "row", names)
