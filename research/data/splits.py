"""`load_splits`: config -> featurised train and evaluation splits.

What a row becomes is the task's business (`research.tasks`): the data layer
reads the columns the task names, caches what its featuriser makes and hands
back `TokenizedSplit`s, whose fields the `Batcher` pads generically.
"""

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from research.data import sources
from research.data import tokenize
from research.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Field:
  """How the `Batcher` gathers and pads one field of a split.

  Attributes:
    name: the batch key ("input_ids", "labels", "start_positions", ...).
    per_token: stored flat over the split's tokens (padded to [B, L]);
      otherwise one value (or row of values) per feature ([B, ...]).
    dtype: the batch dtype.
    pad: the value of padding positions and padding rows (-100: an ignored
      token label).
  """
  name: str
  per_token: bool
  dtype: Any
  pad: Any = 0


def text_fields(pad_id=0):
  """The token fields every split has: input_ids, token_type_ids."""
  return (Field("input_ids", True, np.int32, pad_id),
          Field("token_type_ids", True, np.int32, 0))


@dataclasses.dataclass
class TokenizedSplit:
  """A featurised split ready for `Batcher`: ragged fields plus their specs.

  Attributes:
    name: the split name ("train", "validation", "matched", ...).
    where: the file path or dataset description, for messages.
    offsets: int64 [n + 1]; feature i spans tokens offsets[i]:offsets[i + 1].
    arrays: {field name: array}: per-token fields flat [total_tokens],
      per-feature fields [n, ...].
    fields: the `Field` specs of `arrays`, in batch order.
    rows: int32 [n], each feature's line (files) or row (datasets) number.
    max_length: the truncation length the split was tokenised with.
    has_labels: False when nothing is labelled (a test split to predict).
    examples: per-example arrays of the source (QA contexts and answers),
      for evaluators that post-process predictions; usually empty.
    label_names: the label set in id order (evaluators name classes by it).
  """
  name: str
  where: str
  offsets: np.ndarray
  arrays: dict
  fields: tuple
  rows: np.ndarray
  max_length: int
  has_labels: bool
  examples: dict = dataclasses.field(default_factory=dict)
  label_names: tuple = ()

  def __len__(self):
    return len(self.offsets) - 1

  @property
  def lengths(self):
    """int64 [n], tokens per feature (special tokens included)."""
    return np.diff(self.offsets)

  def head(self, n: int) -> "TokenizedSplit":
    """The first `n` features (all of them when there are fewer)."""
    n = min(n, len(self))
    end = int(self.offsets[n])
    fields = {f.name: f for f in self.fields}
    arrays = {k: v[:end] if k in fields and fields[k].per_token else v[:n]
              for k, v in self.arrays.items()}
    return dataclasses.replace(self, offsets=self.offsets[:n + 1],
                               arrays=arrays, rows=self.rows[:n])

  @property
  def input_ids(self):
    return self.arrays["input_ids"]

  @property
  def token_type_ids(self):
    return self.arrays["token_type_ids"]

  @property
  def labels(self):
    return self.arrays["labels"]

  @classmethod
  def sequence(cls, *, name, where, input_ids, token_type_ids, offsets,
               labels, rows, max_length, has_labels, pad_id=0,
               label_names=()):
    """A split of one sequence-level label per example (int32 or float32)."""
    return cls(name=name, where=where, offsets=offsets,
               arrays={"input_ids": input_ids,
                       "token_type_ids": token_type_ids, "labels": labels},
               fields=text_fields(pad_id) + (
                   Field("labels", False, labels.dtype, 0),),
               rows=rows, max_length=max_length, has_labels=has_labels,
               label_names=tuple(label_names))


def select(enc, keep):
  """The features of an `Encoded` where `keep` [n] is True (token arrays too).

  Returns:
    (offsets, tokens, features, rows, token_keep) of the kept features;
    `token_keep` [total tokens] selects per-token arrays of the same split.
  """
  lengths = np.diff(enc.offsets)
  offsets = np.zeros(int(keep.sum()) + 1, np.int64)
  np.cumsum(lengths[keep], out=offsets[1:])
  token_keep = np.repeat(keep, lengths)
  tokens = {k: v[token_keep] for k, v in enc.tokens.items()}
  features = {k: v[keep] for k, v in enc.features.items()}
  return offsets, tokens, features, enc.rows[keep], token_keep


def parse_eval_files(spec):
  """Parses `data.eval_file`: "dev.tsv" or "matched=a.tsv,mismatched=b.tsv".

  Returns:
    {split name: path}; a single path is the split "validation".
  """
  spec = spec.strip()
  if not spec:
    return {}
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if len(parts) == 1 and "=" not in parts[0]:
    return {"validation": parts[0]}
  out = {}
  for part in parts:
    name, sep, path = part.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise DataError(f"data.eval_file: expected name=path in {part!r} (the "
                      "form is 'matched=dev_m.tsv,mismatched=dev_mm.tsv')")
    if name.strip() in out:
      raise DataError(f"data.eval_file: split {name.strip()!r} given twice")
    out[name.strip()] = path.strip()
  return out


# The source classes of `data.source`; a task may read some kinds its own way
# (`Task.source`: CoNLL files, SQuAD JSON).
SOURCES = {"local": sources.LocalFile, "tfds": sources.TfdsSplit,
           "hf": sources.HfSplit}


def default_source(kind, **kwargs):
  """The `SOURCES[kind]` source of one split, built from `kwargs`."""
  return SOURCES[kind](**kwargs)


def _sources(data, make=default_source):
  """Returns (train source or None, {eval split: source}) for the config.

  `make(kind, **kwargs)` builds each split's source (`Task.source`).
  """
  if data.source == "local":
    local = lambda path: make("local", path=path, fmt=data.format)  # pylint: disable=unnecessary-lambda-assignment
    train = local(data.train_file) if data.train_file else None
    evals = {name: local(path)
             for name, path in parse_eval_files(data.eval_file).items()}
    return train, evals
  if data.source == "tfds":
    if not data.name:
      raise DataError("data.source='tfds' needs data.name, e.g. 'glue/sst2'")
    tfds = lambda split: make("tfds", name=data.name, split=split,  # pylint: disable=unnecessary-lambda-assignment
                              data_dir=data.data_dir)
    train = tfds(data.train_split) if data.train_split else None
    evals = {s: tfds(s) for s in data.eval_splits}
    return train, evals
  if data.source == "hf":
    if not data.name:
      raise DataError("data.source='hf' needs data.name, e.g. 'nyu-mll/glue' "
                      "or 'csv' with data.train_file/eval_file")

    def hf(split, path=None):
      return make("hf", name=data.name, config=data.hf_config, split=split,
                  data_files={split: path} if path else None,
                  cache_dir=data.data_dir)

    if data.train_file or data.eval_file:  # Local files via a builder.
      train_split = data.train_split or "train"
      train = hf(train_split, data.train_file) if data.train_file else None
      evals = {s: hf(s, p) for s, p in parse_eval_files(data.eval_file).items()}
    else:
      train = hf(data.train_split) if data.train_split else None
      evals = {s: hf(s) for s in data.eval_splits}
    return train, evals
  raise DataError(f"data.source must be 'local', 'tfds' or 'hf', got "
                  f"{data.source!r}")


def eval_split_names(data):
  """The evaluation splits a data config names, in order (no data read)."""
  if data.source == "local" or (data.source == "hf" and
                                (data.train_file or data.eval_file)):
    return list(parse_eval_files(data.eval_file))
  return list(data.eval_splits)


def load_splits(config, tokenizer, cache_dir=None, label_names=None,
                task=None):
  """Reads, checks, featurises (cached) and labels the configured splits.

  Args:
    config: the run config (uses `data`, `task`, `num_labels`).
    tokenizer: a Hugging Face fast tokenizer, or a model directory to load
      one from.
    cache_dir: the tokenisation cache when `data.cache_dir` is empty (the
      trainer passes <workdir>/cache); None and "" disable caching.
    label_names: overrides `data.label_names`, e.g. a checkpoint's
      labels.json when evaluating or predicting without a training split.
    task: the run's `research.tasks` task; default: `config.task`'s.

  Returns:
    (train, evals, label_names, skipped): the training `TokenizedSplit` (None
    when there is none), {name: TokenizedSplit} for evaluation, the label
    names in id order (empty for regression and label-free tasks; save them
    with `save_label_names`), and {split name: {reason: rows skipped}} for
    splits that lost rows under data.bad_rows="skip".

  Raises:
    DataError: for missing files or columns, bad rows (under "error"), labels
      outside the label set, or a data config that cannot work.
  """
  data = config.data
  if data.max_length < 4:  # [CLS] a [SEP] b [SEP] needs room for text.
    raise DataError(f"data.max_length={data.max_length} is too short (< 4)")
  if isinstance(tokenizer, str):
    tokenizer = tokenize.load_tokenizer(tokenizer)
  model_max = getattr(tokenizer, "model_max_length", None)
  if model_max and model_max < 1_000_000 and data.max_length > model_max:
    raise DataError(f"data.max_length={data.max_length} exceeds the model's "
                    f"{model_max} positions")
  if task is None:
    from research import tasks  # pylint: disable=import-outside-toplevel
    task = tasks.load(config, tokenizer)
  train_src, eval_srcs = _sources(data, getattr(task, "source",
                                                 default_source))
  tok_hash = tokenize.tokenizer_fingerprint(tokenizer)
  cache = data.cache_dir or cache_dir or None

  def encode(src, training):
    return tokenize.encode_split(
        src, tokenizer, task, data.bad_rows, data.max_length,
        require_labels=training and bool(task.columns()["label_field"]),
        cache_dir=cache, tokenizer_hash=tok_hash)

  train_enc = encode(train_src, True) if train_src else None
  eval_encs = {name: encode(src, False) for name, src in eval_srcs.items()}
  declared = data.label_names if label_names is None else label_names
  names = task.label_names(tuple(declared), train_enc, eval_encs)

  skipped = {}
  train = None
  if train_enc is not None:
    train_name = data.train_split or "train"
    train, counts = task.finish(train_name, train_enc, names, training=True)
    if counts:
      skipped[train_name] = counts
  evals = {}
  for name, enc in eval_encs.items():
    evals[name], counts = task.finish(name, enc, names, training=False)
    if counts:
      skipped[name] = counts
  for name, counts in skipped.items():
    logging.warning("Split %r: skipped rows %s", name, counts)
  return train, evals, names, skipped


def load_file(config, tokenizer, task, path, name, label_names,
              require_labels=True, where="file"):
  """One local file read as the run reads `config.data`'s files (the task's
  columns and featuriser, `data.format`, `data.bad_rows`), not cached.

  What a method reads beside the run's splits: EWC's Fisher examples,
  distillation's unlabelled text.

  Returns:
    The `TokenizedSplit` named `name`, labels mapped by `label_names` (or
    none when `require_labels` is False and the file has none).

  Raises:
    DataError: no such file (naming `where`), or the reader's own errors.
  """
  if not os.path.isfile(path):
    raise DataError(f"{where}={path!r}: no such file")
  source = task.source("local", path=path, fmt=config.data.format)
  enc = tokenize.encode_split(source, tokenizer, task, config.data.bad_rows,
                              config.data.max_length,
                              require_labels=require_labels, cache_dir=None)
  if not require_labels:
    enc = dataclasses.replace(enc, labels=None)
  split, _ = task.finish(name, enc, label_names, training=False)
  return split

