"""SQuAD v1.1 / v2.0 examples and their windowed features.

Readers (each returns a `SquadData` of checked `SquadExample`s):

- `read_squad(path)`: the official JSON (`version`, `data` -> articles ->
  `paragraphs` -> `context`, `qas` -> `id`, `question`, `answers`
  [{`text`, `answer_start`}], `is_impossible`).
- `load_squad_tfds(split, "squad/v2.0")`: TFDS `squad/v1.1`, `squad/v2.0`.
- `load_squad_hf(split, "rajpurkar/squad_v2")`: Hugging Face `squad`,
  `squad_v2`.

A bad question (an answer_start outside its context, an answer text that is
not at its answer_start, an unanswerable question with answers, ...) raises
a `DataError` naming the file (or split) and the question id; with
`bad_rows="skip"` it is dropped and counted instead.

`build_features` cuts each (question, context) into windows of `max_length`
tokens that overlap by `doc_stride` tokens (Hugging Face's `stride`; the
original BERT `run_squad.py` used doc_stride as the step between window
starts instead), keeps each token's character span in the context and, for
training, the answer's start/end token in every window that holds all of it
(the [CLS] position otherwise, and for unanswerable questions).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np

from research.data import errors
from research.data.errors import DataError

# Reasons a question can be dropped for (bad_rows="skip").
BAD_QUESTION = "malformed question"
BAD_SPAN = "answer span mismatch"


@dataclasses.dataclass(frozen=True)
class SquadExample:
  """One question about one context.

  Attributes:
    id: the question id (the key of predictions.json).
    title: the article title ("" when the source has none).
    context: the paragraph, exactly as in the source (never stripped:
      answer_start counts its characters).
    question: the question text.
    answers: the gold answer texts (v1.1 dev and v2.0 dev: up to 6 per
      question, train: 1); () for an unanswerable question.
    answer_starts: each answer's character offset in `context`.
    is_impossible: v2.0's unanswerable flag.
  """
  id: str
  title: str
  context: str
  question: str
  answers: tuple = ()
  answer_starts: tuple = ()
  is_impossible: bool = False


@dataclasses.dataclass
class SquadData:
  """The checked examples of one file or split.

  Attributes:
    where: the file path or split description used in messages.
    version_2: SQuAD v2.0 (unanswerable questions possible, scored with the
      v2.0 script).
    examples: the questions that passed the checks, in source order.
    skipped: questions dropped under bad_rows="skip", by reason.
  """
  where: str
  version_2: bool
  examples: list
  skipped: dict


def gold_answers(examples) -> dict:
  """{question id: gold answer texts} for `research.metrics.squad`."""
  return {ex.id: list(ex.answers) for ex in examples}


class _Checker:
  """Checks questions and keeps the good ones (RowPolicy: error or skip)."""

  def __init__(self, where, bad_rows, check_spans, policy=None):
    self.policy = policy or errors.RowPolicy(bad_rows, where, "question")
    self.check_spans = check_spans
    self.examples = []
    self.seen = set()

  def add(self, title, context, qid, question, texts, starts, impossible):
    """Checks one question; keeps it, or reports it through the policy."""
    bad = lambda reason, detail: self.policy.bad(qid, reason, detail)  # pylint: disable=unnecessary-lambda-assignment
    if not isinstance(qid, str) or not qid:
      raise DataError(f"{self.policy.where}: a question in article {title!r} "
                      f"has no string 'id' (got {qid!r})")
    if qid in self.seen:
      return bad(BAD_QUESTION, "the id is used by an earlier question too")
    if not isinstance(context, str) or not context.strip():
      return bad(BAD_QUESTION, "its paragraph has no context text")
    if not isinstance(question, str) or not question.strip():
      return bad(BAD_QUESTION, "the question text is missing or empty")
    if not isinstance(impossible, bool):
      return bad(BAD_QUESTION, f"is_impossible is {impossible!r}, not a "
                 "boolean")
    if impossible and texts:
      return bad(BAD_QUESTION, "is_impossible is true but it has answers")
    if not impossible and not texts:
      return bad(BAD_QUESTION, "no answers (and is_impossible is not true)")
    for text, start in zip(texts, starts):
      if not isinstance(text, str) or not text.strip():
        return bad(BAD_QUESTION, f"answer text {text!r} is empty")
      if isinstance(start, bool) or not isinstance(start, int):
        return bad(BAD_QUESTION, f"answer_start {start!r} is not an integer")
      if not self.check_spans:
        continue
      if start < 0 or start + len(text) > len(context):
        return bad(BAD_SPAN, f"answer {text!r} at answer_start {start} lies "
                   f"outside the context ({len(context)} characters)")
      found = context[start:start + len(text)]
      if found != text:
        return bad(BAD_SPAN, f"answer text {text!r} is not at answer_start "
                   f"{start}: the context there reads {found!r}")
    self.seen.add(qid)
    self.examples.append(SquadExample(
        id=qid, title=title, context=context, question=question,
        answers=tuple(texts), answer_starts=tuple(starts),
        is_impossible=impossible))

  def result(self, version_2):
    return SquadData(where=self.policy.where, version_2=version_2,
                     examples=self.examples, skipped=dict(self.policy.counts))


def _answer_list(checker, qid, answers):
  """(texts, starts) of an official-JSON answers list, or None if malformed."""
  if not isinstance(answers, list) or not all(
      isinstance(a, dict) and "text" in a and "answer_start" in a
      for a in answers):
    checker.policy.bad(qid, BAD_QUESTION, "'answers' must be a list of "
                       "{'text', 'answer_start'} objects")
    return None
  return [a["text"] for a in answers], [a["answer_start"] for a in answers]


def read_squad(path: str, *, bad_rows: str = "error",
               check_spans: bool = True) -> SquadData:
  """Reads an official SQuAD JSON file.

  Args:
    path: the file (e.g. train-v1.1.json, dev-v2.0.json).
    bad_rows: "error" raises at the first bad question, "skip" drops it.
    check_spans: check that each answer's text is at its answer_start. The
      official evaluation scripts use the texts only; training needs spans.

  Returns:
    A `SquadData`; version_2 when the file's version is 2.x or any question
    has is_impossible set.

  Raises:
    DataError: an unreadable file or structure (naming the file), or a bad
      question under bad_rows="error" (naming the file and question id).
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  with open(path, encoding="utf-8") as f:
    try:
      root = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{path}: not a valid JSON file ({e})") from None
  if not isinstance(root, dict) or not isinstance(root.get("data"), list):
    raise DataError(f"{path}: expected the official SQuAD layout "
                    '{"version": ..., "data": [articles]}')
  version = str(root.get("version", ""))
  checker = _Checker(path, bad_rows, check_spans)
  any_impossible = False
  for a, article in enumerate(root["data"]):
    if not isinstance(article, dict) or not isinstance(
        article.get("paragraphs"), list):
      raise DataError(f"{path}: article {a} has no 'paragraphs' list")
    title = str(article.get("title", ""))
    for p, paragraph in enumerate(article["paragraphs"]):
      if not isinstance(paragraph, dict) or not isinstance(
          paragraph.get("qas"), list):
        raise DataError(f"{path}: article {title!r}, paragraph {p} has no "
                        "'qas' list")
      context = paragraph.get("context")
      for qa in paragraph["qas"]:
        if not isinstance(qa, dict):
          raise DataError(f"{path}: article {title!r}, paragraph {p}: a "
                          "question is not a JSON object")
        qid = qa.get("id")
        answers = _answer_list(checker, qid, qa.get("answers", []))
        if answers is None:
          continue
        impossible = qa.get("is_impossible", False)
        any_impossible |= impossible is True
        checker.add(title, context, qid, qa.get("question"), *answers,
                    impossible)
  return checker.result(version.lstrip("v").startswith("2") or any_impossible)


def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_squad_tfds(split: str, name: str = "squad/v2.0", *,
                    data_dir: str | None = None, bad_rows: str = "error",
                    check_spans: bool = True) -> SquadData:
  """Loads a TFDS SQuAD split (`squad/v1.1` or `squad/v2.0`).

  Args:
    split: "train" or "validation".
    name: the TFDS name.
    data_dir: the TFDS data directory (None: its default).
    bad_rows: "error" or "skip", as in `read_squad`.
    check_spans: as in `read_squad`.

  Returns:
    A `SquadData`, the same as `read_squad` of the same data gives.
  """
  import tensorflow_datasets as tfds  # Heavy; only when this source is used.
  where = f"tfds {name} split {split!r}"
  try:
    ds, info = tfds.load(name, split=split, data_dir=data_dir, with_info=True)
  except Exception as e:  # Unknown name or split, no network: say which.
    raise DataError(f"{where}: cannot load ({e})") from e
  version_2 = "is_impossible" in info.features
  checker = _Checker(where, bad_rows, check_spans)
  for row in tfds.as_numpy(ds):
    answers = row["answers"]
    impossible = bool(row["is_impossible"]) if version_2 else False
    checker.add(_text(row["title"]), _text(row["context"]), _text(row["id"]),
                _text(row["question"]),
                [_text(t) for t in answers["text"]],
                [int(s) for s in answers["answer_start"]], impossible)
  return checker.result(version_2)


def load_squad_hf(split: str, name: str = "rajpurkar/squad_v2", *,
                  config: str | None = None, cache_dir: str | None = None,
                  version_2: bool | None = None, bad_rows: str = "error",
                  check_spans: bool = True) -> SquadData:
  """Loads a Hugging Face SQuAD split (`rajpurkar/squad`, `.../squad_v2`).

  The datasets have no is_impossible column: a question without answers is
  unanswerable.

  Args:
    split: "train" or "validation".
    name: the dataset name on the hub.
    config: the dataset config, if any.
    cache_dir: the Hugging Face cache directory (None: its default).
    version_2: score as v2.0; None: when the name contains "v2" or some
      question has no answer.
    bad_rows: "error" or "skip", as in `read_squad`.
    check_spans: as in `read_squad`.

  Returns:
    A `SquadData`, the same as `read_squad` of the same data gives.
  """
  import datasets  # Heavy; only when this source is used.
  where = f"hf {name} split {split!r}"
  try:
    ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
  except Exception as e:
    raise DataError(f"{where}: cannot load ({e})") from e
  missing = {"id", "title", "context", "question", "answers"} - set(
      ds.column_names)
  if missing:
    raise DataError(f"{where}: no column(s) {sorted(missing)}; the columns "
                    f"are {ds.column_names}")
  checker = _Checker(where, bad_rows, check_spans)
  any_empty = False
  for row in ds:
    texts = list(row["answers"]["text"])
    any_empty |= not texts
    checker.add(row["title"], row["context"], row["id"], row["question"],
                texts, [int(s) for s in row["answers"]["answer_start"]],
                not texts)
  if version_2 is None:
    version_2 = "v2" in name.lower() or any_empty
  return checker.result(version_2)


# --- Sources of the training pipeline ---------------------------------------------


def _as_raw(data):
  """A `SquadData` as the `sources.RawSplit` every source gives: question
  and context texts; the answers, id, title and is_impossible as JSON."""
  from research.data import sources  # pylint: disable=import-outside-toplevel
  labels = [json.dumps({"text": list(ex.answers),
                        "answer_start": list(ex.answer_starts), "id": ex.id,
                        "title": ex.title, "is_impossible": ex.is_impossible},
                       ensure_ascii=False) for ex in data.examples]
  return sources.RawSplit(
      where=data.where, unit="question",
      texts=[[ex.question for ex in data.examples],
             [ex.context for ex in data.examples]],
      labels=labels, rows=list(range(1, len(labels) + 1)),
      skipped=data.skipped)


class SquadFile:
  """An official SQuAD JSON file as a data source of the training pipeline.

  `research.tasks.question_answering` reads `data.train_file` /
  `data.eval_file` through it (`data.format="squad"`, or "auto" and a
  .json file in the official layout); errors name the file and question id.
  """

  def __init__(self, path):
    self.path = path

  def identity(self):
    """What the tokenisation cache is keyed on: path and content."""
    from research.data import sources  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(self.path):
      raise DataError(f"{self.path}: no such file")
    return {"source": "squad", "path": os.path.abspath(self.path),
            "sha256": sources.file_sha256(self.path)}

  def read(self, text_fields, label_field, bad_rows, require_labels,
           words=False, label_json=True):
    """The file's questions as a `RawSplit` (see `sources.LocalFile.read`)."""
    del text_fields, label_field, require_labels, words, label_json
    return _as_raw(read_squad(self.path, bad_rows=bad_rows))


def is_squad_json(path: str) -> bool:
  """Whether a .json file has the official layout ({"data": [...]})."""
  if os.path.splitext(path)[1].lower() != ".json" or not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    head = f.read(4096).lstrip()
  # JSON lines start with a row object; the official file with its keys.
  return head.startswith(b"{") and (b'"data"' in head or b'"version"' in head)


def _dataset_source(base, reader):
  """A TFDS / Hugging Face source class reading with a SQuAD loader."""

  class Source(base):
    """`base` (its identity), read with `reader` into a RawSplit."""

    def read(self, text_fields, label_field, bad_rows, require_labels,
             words=False, label_json=True):
      del text_fields, label_field, require_labels, words, label_json
      return _as_raw(reader(self, bad_rows))

  Source.__name__ = f"Squad{base.__name__}"
  return Source


def _tfds_source():
  from research.data import sources  # pylint: disable=import-outside-toplevel
  return _dataset_source(sources.TfdsSplit, lambda s, bad: load_squad_tfds(
      s.split, s.name, data_dir=s.data_dir, bad_rows=bad))


def _hf_source():
  from research.data import sources  # pylint: disable=import-outside-toplevel
  return _dataset_source(sources.HfSplit, lambda s, bad: load_squad_hf(
      s.split, s.name, config=s.config, cache_dir=s.cache_dir, bad_rows=bad))


def source(kind, **kwargs):
  """The SQuAD reader of one split of `config.data` (`Task.source`).

  local: `SquadFile` for the official JSON (else None: JSON lines rows);
  tfds: `squad/v1.1`, `squad/v2.0`; hf: `rajpurkar/squad(_v2)` (else None
  for local files through a builder such as "json").
  """
  if kind == "local":
    fmt, path = kwargs["fmt"], kwargs["path"]
    return SquadFile(path) if fmt == "squad" or (
        fmt == "auto" and is_squad_json(path)) else None
  if kind == "tfds":
    return _tfds_source()(**kwargs)
  if kind == "hf" and not kwargs.get("data_files"):
    return _hf_source()(**kwargs)
  return None


def examples_from_rows(raw, policy, *, check_spans: bool = True):
  """The `SquadExample`s of a `RawSplit`, checked; rows failing go to policy.

  Rows are question and context texts and, when labeled, SQuAD's answers as
  JSON (`{"text": [...], "answer_start": [...]}`, plus id, title and
  is_impossible from `SquadFile` and the TFDS / HF readers). A row without
  an id is named by its row number; one without answers is unanswerable.

  Returns:
    (examples, keep bool [rows]).
  """
  checker = _Checker(raw.where, policy.mode, check_spans, policy=policy)
  keep = np.zeros(len(raw.rows), bool)
  questions, contexts = raw.texts
  for i, row in enumerate(raw.rows):
    if raw.labels is None:  # Unlabeled: nothing to check but the texts.
      checker.examples.append(SquadExample(
          id=str(row), title="", context=contexts[i], question=questions[i]))
      keep[i] = True
      continue
    label = json.loads(raw.labels[i])
    if not isinstance(label, dict) or not isinstance(
        label.get("text"), list) or not isinstance(
            label.get("answer_start"), list) or len(label["text"]) != len(
                label["answer_start"]):
      policy.bad(row, BAD_QUESTION, f"answers {raw.labels[i][:200]} is not "
                 '{"text": [...], "answer_start": [...]} of equal lengths')
      continue
    before = len(checker.examples)
    checker.add(label.get("title", ""), contexts[i], label.get("id", str(row)),
                questions[i], label["text"], label["answer_start"],
                label.get("is_impossible", not label["text"]))
    keep[i] = len(checker.examples) > before
  return checker.examples, keep


def answerable_only(root: dict) -> dict:
  """A SQuAD v2.0 file's answerable questions as a v1.1 file.

  Unanswerable questions are dropped, `is_impossible` and
  `plausible_answers` removed, and "version" set to "1.1": what the v1.1
  recipe and official script read (experiments/squad_v1.py).
  """
  data = []
  for article in root["data"]:
    paragraphs = []
    for paragraph in article["paragraphs"]:
      qas = [{k: v for k, v in qa.items()
              if k not in ("is_impossible", "plausible_answers")}
             for qa in paragraph["qas"] if not qa.get("is_impossible")]
      if qas:
        paragraphs.append({**paragraph, "qas": qas})
    data.append({**article, "paragraphs": paragraphs})
  return {**root, "version": "1.1", "data": data}


def split_by_article(path: str, out_dir: str, dev_articles,
                     answerable: bool = False) -> tuple:
  """Writes the articles `dev_articles` (indices) as dev, the rest as train.

  Whole articles go to one side, so no context is in both. With
  `answerable`, both sides keep only the answerable questions, as v1.1
  files (`answerable_only`). Returns the (train, dev) paths:
  <out_dir>/<name>-train.json and -dev.json (-v1.1-train.json and
  -v1.1-dev.json with `answerable`).
  """
  with open(path, encoding="utf-8") as f:
    root = json.load(f)
  if answerable:
    root = answerable_only(root)
  articles = root["data"]
  dev = sorted(set(int(i) for i in dev_articles))
  if not dev or dev[0] < 0 or dev[-1] >= len(articles) or len(dev) == len(
      articles):
    raise DataError(f"{path}: {len(articles)} articles; dev_articles must be "
                    f"some (not all) of 0..{len(articles) - 1}, got {dev}")
  os.makedirs(out_dir, exist_ok=True)
  name = os.path.splitext(os.path.basename(path))[0] + (
      "-v1.1" if answerable else "")
  out = []
  for part, data in (
      ("train", [a for i, a in enumerate(articles) if i not in dev]),
      ("dev", [articles[i] for i in dev])):
    target = os.path.join(out_dir, f"{name}-{part}.json")
    with open(target, "w", encoding="utf-8") as f:
      json.dump({**root, "data": data}, f, ensure_ascii=False)
    out.append(target)
  return tuple(out)


# --- Windowed features ------------------------------------------------------------


@dataclasses.dataclass
class QAFeatures:
  """Windows of (question, context) pairs, stored flat like the token cache.

  Feature f is tokens `offsets[f]:offsets[f + 1]` of the flat arrays.

  Attributes:
    input_ids: int32 [T], [CLS] question [SEP] context window [SEP].
    token_type_ids: int8 [T].
    char_spans: int32 [T, 2], each context token's [start, end) character
      span in its example's context; (-1, -1) for question and special tokens.
    is_context: bool [T], the tokens of the context window.
    offsets: int64 [F + 1].
    example_index: int32 [F], the feature's example (index into `examples`).
    cls_index: int32 [F], the [CLS] position: the target of "no answer".
    start_positions, end_positions: int32 [F], the answer's first and last
      token (training targets); `cls_index` when the window does not hold the
      whole first answer or the question is unanswerable.
  """
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  char_spans: np.ndarray
  is_context: np.ndarray
  offsets: np.ndarray
  example_index: np.ndarray
  cls_index: np.ndarray
  start_positions: np.ndarray
  end_positions: np.ndarray

  def __len__(self):
    return len(self.example_index)

  @property
  def lengths(self) -> np.ndarray:
    """int64 [F]: tokens per feature."""
    return np.diff(self.offsets)

  def padded(self, name: str, fill=0, length: int | None = None) -> np.ndarray:
    """One flat attribute as a padded [F, length, ...] array.

    Args:
      name: "input_ids", "token_type_ids", "char_spans" or "is_context".
      fill: the value of positions past each feature's end.
      length: the padded length (default: the longest feature).
    """
    flat = getattr(self, name)
    lengths = self.lengths
    length = int(lengths.max()) if length is None else length
    out = np.full((len(self), length) + flat.shape[1:], fill, flat.dtype)
    rows = np.repeat(np.arange(len(self)), lengths)
    cols = np.arange(len(flat)) - np.repeat(self.offsets[:-1], lengths)
    out[rows, cols] = flat
    return out


def _truncate_questions(tokenizer, questions, max_query_length):
  """Cuts each question after its first max_query_length tokens (BERT's
  max_query_length), at a character boundary of the tokenizer's own."""
  enc = tokenizer(questions, add_special_tokens=False,
                  return_offsets_mapping=True, return_attention_mask=False)
  return [q if len(spans) <= max_query_length
          else q[:spans[max_query_length - 1][1]]
          for q, spans in zip(questions, enc["offset_mapping"])]


def _targets(spans, context, ex, cls):
  """(start, end) token of ex's first answer in one window, else (cls, cls).

  Args:
    spans: int [L, 2] character spans, (-1, -1) outside the context.
    context: bool [L], the window's context tokens.
    ex: the SquadExample.
    cls: the window's [CLS] position.
  """
  if not ex.answers:
    return cls, cls
  start_char = ex.answer_starts[0]
  end_char = start_char + len(ex.answers[0])
  tokens = np.flatnonzero(context)
  if spans[tokens[0], 0] > start_char or spans[tokens[-1], 1] < end_char:
    return cls, cls  # The window does not hold the whole answer.
  # The token holding the first character (the last to start at or before
  # it), and the first token to end at or after the last character.
  start = tokens[np.flatnonzero(spans[tokens, 0] <= start_char)[-1]]
  end = tokens[np.flatnonzero(spans[tokens, 1] >= end_char)[0]]
  return int(start), int(end)


def build_features(tokenizer, examples, *, max_length: int = 384,
                   doc_stride: int = 128, max_query_length: int = 64,
                   chunk: int = 1000) -> QAFeatures:
  """Tokenises examples into overlapping windows with training targets.

  Args:
    tokenizer: a Hugging Face fast tokenizer (question first, then context).
    examples: `SquadExample`s.
    max_length: tokens per window, special tokens included.
    doc_stride: tokens shared by consecutive windows of one context.
    max_query_length: questions are cut to this many tokens.
    chunk: examples per tokenizer call (bounded memory).

  Returns:
    `QAFeatures`, one or more per example, in example order.

  Raises:
    DataError: windows too short for the stride or the question length.
  """
  if not getattr(tokenizer, "is_fast", False):
    raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; "
                    "SQuAD features need its offset mappings")
  room = max_length - max_query_length - tokenizer.num_special_tokens_to_add(
      pair=True)
  if not 0 <= doc_stride < room:
    raise DataError(
        f"doc_stride={doc_stride} must be in [0, {room}): each window holds "
        f"max_length={max_length} - max_query_length={max_query_length} - "
        "special tokens of context at least, and consecutive windows must "
        "advance")
  ids, types, spans, is_context, lengths = [], [], [], [], []
  example_index, cls_index, starts, ends = [], [], [], []
  for first in range(0, len(examples), chunk):
    part = examples[first:first + chunk]
    # Leading whitespace is useless and, for byte-level BPE tokenizers,
    # costs tokens the window needs.
    questions = _truncate_questions(
        tokenizer, [ex.question.lstrip() for ex in part], max_query_length)
    enc = tokenizer(questions, [ex.context for ex in part],
                    truncation="only_second", max_length=max_length,
                    stride=doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, return_token_type_ids=True,
                    return_attention_mask=False)
    for f, local in enumerate(enc["overflow_to_sample_mapping"]):
      sequence = np.asarray([s if s is not None else -1
                             for s in enc.sequence_ids(f)])
      context = sequence == 1
      window = np.asarray(enc["offset_mapping"][f], np.int32).reshape(-1, 2)
      window[~context] = -1
      input_ids = enc["input_ids"][f]
      cls = input_ids.index(tokenizer.cls_token_id)
      start, end = _targets(window, context, part[local], cls)
      ids.append(input_ids)
      types.append(enc["token_type_ids"][f])
      spans.append(window)
      is_context.append(context)
      lengths.append(len(input_ids))
      example_index.append(first + local)
      cls_index.append(cls)
      starts.append(start)
      ends.append(end)
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  as_int32 = lambda v: np.asarray(v, np.int32)  # pylint: disable=unnecessary-lambda-assignment
  return QAFeatures(
      input_ids=np.fromiter(itertools.chain.from_iterable(ids), np.int32,
                            count=int(offsets[-1])),
      token_type_ids=np.fromiter(itertools.chain.from_iterable(types),
                                 np.int8, count=int(offsets[-1])),
      char_spans=(np.concatenate(spans) if spans
                  else np.zeros((0, 2), np.int32)),
      is_context=(np.concatenate(is_context) if is_context
                  else np.zeros(0, bool)),
      offsets=offsets, example_index=as_int32(example_index),
      cls_index=as_int32(cls_index), start_positions=as_int32(starts),
      end_positions=as_int32(ends))


def main(argv=None):
  """`python -m research.data.squad FILE OUT_DIR --dev_articles 5,7
  [--answerable_only]`."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      description="Split an official SQuAD JSON file by article into "
      "<name>-train.json and <name>-dev.json (the given articles).")
  parser.add_argument("file")
  parser.add_argument("out_dir")
  parser.add_argument("--dev_articles", required=True,
                      help="comma-separated article indices (from 0)")
  parser.add_argument("--answerable_only", action="store_true",
                      help="keep the answerable questions only, as SQuAD "
                      "v1.1 files (for experiments/squad_v1.py)")
  args = parser.parse_args(argv)
  dev = [int(i) for i in args.dev_articles.split(",")]
  for path in split_by_article(args.file, args.out_dir, dev,
                               args.answerable_only):
    data = read_squad(path)
    print(f"{path}: {len(data.examples)} questions, "
          f"{sum(ex.is_impossible for ex in data.examples)} unanswerable")


if __name__ == "__main__":
  main()
