"""`load_splits`: config -> tokenised train and evaluation splits."""

import collections
import dataclasses
import logging

import numpy as np

from research.data import labels as labels_lib
from research.data import sources
from research.data import tokenize
from research.data.errors import DataError, RowPolicy

TASKS = ("sequence_classification", "masked_lm")


@dataclasses.dataclass
class TokenizedSplit:
  """A tokenised split ready for `Batcher`.

  Attributes:
    name: the split name ("train", "validation", "matched", ...).
    where: the file path or dataset description, for messages.
    input_ids: int32 [total_tokens], the examples back to back.
    token_type_ids: int8 [total_tokens].
    offsets: int64 [n + 1]; example i spans offsets[i]:offsets[i + 1].
    labels: int32 [n] label ids, or float32 [n] for regression; -1 where an
      evaluation example has no label.
    rows: int32 [n], each example's line (files) or row (datasets) number.
    max_length: the truncation length the split was tokenised with.
    has_labels: False when no example has a label (a test split to predict).
  """
  name: str
  where: str
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  offsets: np.ndarray
  labels: np.ndarray
  rows: np.ndarray
  max_length: int
  has_labels: bool

  def __len__(self):
    return len(self.offsets) - 1

  @property
  def lengths(self):
    """int64 [n], tokens per example (special tokens included)."""
    return np.diff(self.offsets)


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


def _sources(data):
  """Returns (train source or None, {eval split: source}) for the config."""
  if data.source == "local":
    train = sources.LocalFile(data.train_file, data.format) \
        if data.train_file else None
    evals = {name: sources.LocalFile(path, data.format)
             for name, path in parse_eval_files(data.eval_file).items()}
    return train, evals
  if data.source == "tfds":
    if not data.name:
      raise DataError("data.source='tfds' needs data.name, e.g. 'glue/sst2'")
    train = sources.TfdsSplit(data.name, data.train_split, data.data_dir) \
        if data.train_split else None
    evals = {s: sources.TfdsSplit(data.name, s, data.data_dir)
             for s in data.eval_splits}
    return train, evals
  if data.source == "hf":
    if not data.name:
      raise DataError("data.source='hf' needs data.name, e.g. 'nyu-mll/glue' "
                      "or 'csv' with data.train_file/eval_file")

    def hf(split, path=None):
      return sources.HfSplit(data.name, data.hf_config, split,
                             {split: path} if path else None, data.data_dir)

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


def _finish(name, enc, names, regression, bad_rows, max_length, training):
  """Maps labels, drops rows with bad labels, returns a TokenizedSplit."""
  policy = RowPolicy(bad_rows, enc.where, enc.unit)
  n = len(enc.rows)
  if enc.labels is None:
    label_ids = np.full(n, -1, np.float32 if regression else np.int32)
    keep = np.ones(n, bool)
  else:
    label_ids, keep = labels_lib.map_labels(
        enc.labels, names, regression, policy, enc.rows, training)
  if not keep.any():
    raise DataError(f"{enc.where}: no usable rows (skipped: "
                    f"{dict(policy.counts)})")
  lengths = np.diff(enc.offsets)
  offsets = np.zeros(int(keep.sum()) + 1, np.int64)
  np.cumsum(lengths[keep], out=offsets[1:])
  token_keep = np.repeat(keep, lengths)  # Drop the tokens of dropped rows.
  split = TokenizedSplit(
      name=name, where=enc.where, input_ids=enc.input_ids[token_keep],
      token_type_ids=enc.token_type_ids[token_keep], offsets=offsets,
      labels=label_ids, rows=enc.rows[keep], max_length=max_length,
      has_labels=enc.labels is not None and bool((label_ids != -1).any()))
  skipped = collections.Counter(enc.skipped)
  skipped.update(policy.counts)
  return split, dict(skipped)


def load_splits(config, tokenizer, cache_dir=None, label_names=None):
  """Reads, checks, tokenises (cached) and labels the configured splits.

  Args:
    config: the run config (uses `data`, `task`, `num_labels`).
    tokenizer: a Hugging Face fast tokenizer, or a model directory to load
      one from.
    cache_dir: the tokenisation cache when `data.cache_dir` is empty (the
      trainer passes <workdir>/cache); None and "" disable caching.
    label_names: overrides `data.label_names`, e.g. a checkpoint's
      labels.json when evaluating or predicting without a training split.

  Returns:
    (train, evals, label_names, skipped): the training `TokenizedSplit` (None
    when there is none), {name: TokenizedSplit} for evaluation, the label
    names in id order (empty for regression; save them with
    `save_label_names`), and {split name: {reason: rows skipped}} for splits
    that lost rows under data.bad_rows="skip".

  Raises:
    DataError: for missing files or columns, bad rows (under "error"), labels
      outside the label set, or a data config that cannot work.
  """
  data = config.data
  if config.task not in TASKS:
    raise DataError(f"research.data builds sequence-level inputs for tasks "
                    f"{TASKS}; task={config.task!r} is not supported")
  text_fields = tuple(data.text_fields)
  if len(text_fields) not in (1, 2):
    raise DataError(f"data.text_fields must name one text or a pair, got "
                    f"{text_fields}")
  if data.max_length < 4:  # [CLS] a [SEP] b [SEP] needs room for text.
    raise DataError(f"data.max_length={data.max_length} is too short (< 4)")
  if isinstance(tokenizer, str):
    tokenizer = tokenize.load_tokenizer(tokenizer)
  model_max = getattr(tokenizer, "model_max_length", None)
  if model_max and model_max < 1_000_000 and data.max_length > model_max:
    raise DataError(f"data.max_length={data.max_length} exceeds the model's "
                    f"{model_max} positions")
  regression = config.task == "sequence_classification" and \
      config.num_labels == 1
  # Masked LM needs texts only.
  label_field = data.label_field if config.task != "masked_lm" else ""
  train_src, eval_srcs = _sources(data)
  tok_hash = tokenize.tokenizer_fingerprint(tokenizer)
  cache = data.cache_dir or cache_dir or None

  def encode(src, training):
    return tokenize.encode_split(
        src, tokenizer, text_fields, label_field, data.bad_rows,
        data.max_length, require_labels=training and bool(label_field),
        cache_dir=cache, tokenizer_hash=tok_hash)

  train_enc = encode(train_src, True) if train_src else None
  eval_encs = {name: encode(src, False) for name, src in eval_srcs.items()}

  if label_field:
    declared = data.label_names if label_names is None else label_names
    source_names = next((e.label_names for e in [train_enc, *eval_encs.values()]
                         if e is not None and e.label_names), None)
    names = labels_lib.resolve_label_names(
        tuple(declared), source_names,
        train_enc.labels if train_enc is not None and
        train_enc.labels is not None else None,
        [e.labels for e in eval_encs.values() if e.labels is not None],
        config.num_labels)
  else:
    names = ()

  skipped = {}
  train = None
  if train_enc is not None:
    train_name = data.train_split or "train"
    train, counts = _finish(train_name, train_enc, names, regression,
                            data.bad_rows, data.max_length, training=True)
    if counts:
      skipped[train_name] = counts
  evals = {}
  for name, enc in eval_encs.items():
    evals[name], counts = _finish(name, enc, names, regression, data.bad_rows,
                                  data.max_length, training=False)
    if counts:
      skipped[name] = counts
  for name, counts in skipped.items():
    logging.warning("Split %r: skipped rows %s", name, counts)
  return train, evals, names, skipped
