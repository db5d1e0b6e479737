"""Tokenisation with a Hugging Face fast tokenizer, cached on disk.

A split is featurised once by its task (`research.tasks`: no padding; tokens
stored flat with offsets, one feature or several per example) and saved as
.npz under the cache directory. The file name is a hash of everything that
determines its content: the source's identity (file path and content hash, or
dataset name/version/split), the columns read, the task's featuriser and its
options, bad-row policy, max_length and the tokenizer's full definition.
Labels are cached raw, so the label set is applied afterwards and never
invalidates the cache.
"""

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import tempfile

import numpy as np

from research.data.errors import DataError, RowPolicy

# Bump when the cached arrays change meaning.
CACHE_VERSION = 2
_CHUNK = 8192  # Examples per tokenizer call: bounded memory for big splits.


def load_tokenizer(name_or_dir):
  """Loads the Hugging Face fast tokenizer of a model directory (or name).

  A local directory whose tokenizer_config.json names its class loads that
  class directly, as `AutoTokenizer` would: `AutoTokenizer` also imports
  transformers' model-configuration code and with it torch, about 2 s of
  every run's start-up on CPU. Anything else goes through `AutoTokenizer`.
  """
  import transformers  # Heavy; only when a tokenizer is needed.
  cls = getattr(transformers, _tokenizer_class(name_or_dir) or "", None)
  if cls is None:
    return transformers.AutoTokenizer.from_pretrained(name_or_dir)
  return cls.from_pretrained(name_or_dir)


def _tokenizer_class(name_or_dir) -> str | None:
  """The class named by a local directory's tokenizer_config.json, if any."""
  path = os.path.join(str(name_or_dir), "tokenizer_config.json")
  try:
    with open(path, encoding="utf-8") as f:
      name = json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    return None
  return name if isinstance(name, str) else None


def tokenizer_fingerprint(tokenizer):
  """Returns a hex hash of the tokenizer's full definition.

  Hashes the serialized fast tokenizer (vocabulary, normalizer, special
  tokens, post-processor) minus its transient truncation/padding state, which
  changes with every call and does not affect what we store.
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; "
                    "the data pipeline needs one (tokenizer.json)")
  spec = json.loads(backend.to_str())
  spec.pop("truncation", None)
  spec.pop("padding", None)
  blob = type(tokenizer).__name__ + json.dumps(spec, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass
class Encoded:
  """A featurised split as cached: flat token arrays plus raw labels.

  A feature is one model input (one row of a batch); an example is one row
  of the source. Most tasks make one feature per example; extractive QA
  makes several (windows over a long context).

  Attributes:
    offsets: int64 [n + 1]; feature i spans tokens offsets[i]:offsets[i+1].
    tokens: per-token arrays, flat [offsets[-1]]: at least input_ids and
      token_type_ids, plus the task's (e.g. raw token labels' positions).
    features: per-feature arrays [n, ...] (e.g. answer positions).
    labels: raw labels (str), per feature [n] or per token (a task with
      token labels), or None when the split is unlabeled.
    rows: int32 [n], the line/row number of each feature's example.
    where: the source's description for messages.
    unit: "line" or "row" (what `rows` counts).
    skipped: rows dropped while reading or featurising, by reason.
    label_names: the source's own label names, or None.
    examples: per-example arrays of the source (e.g. QA contexts), for
      post-processing predictions; empty for most tasks.
  """
  offsets: np.ndarray
  tokens: dict
  features: dict
  labels: np.ndarray | None
  rows: np.ndarray
  where: str
  unit: str
  skipped: dict
  label_names: tuple | None
  examples: dict = dataclasses.field(default_factory=dict)

  def __len__(self):
    return len(self.offsets) - 1


def encode(tokenizer, texts, max_length):
  """Tokenises texts (or text pairs) BERT-style, truncated to max_length.

  Args:
    tokenizer: a Hugging Face fast tokenizer.
    texts: one list of strings (single texts) or two (pairs; the second gets
      token_type_id 1, longest-first truncation).
    max_length: the most tokens per example, special tokens included.

  Returns:
    (input_ids int32 [T], token_type_ids int8 [T], offsets int64 [n + 1]).
  """
  n = len(texts[0])
  ids, types, lengths = [], [], []
  for start in range(0, n, _CHUNK):
    parts = [t[start:start + _CHUNK] for t in texts]
    out = tokenizer(*parts, truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=True)
    # Per-chunk numpy arrays: Python int lists of a whole corpus are huge.
    ids.append(np.fromiter(itertools.chain.from_iterable(out["input_ids"]),
                           np.int32))
    types.append(np.fromiter(
        itertools.chain.from_iterable(out["token_type_ids"]), np.int8))
    lengths.append(np.fromiter(map(len, out["input_ids"]), np.int64))
  offsets = np.zeros(n + 1, np.int64)
  np.cumsum(np.concatenate(lengths), out=offsets[1:])
  return np.concatenate(ids), np.concatenate(types), offsets


_GROUPS = ("tokens", "features", "examples")


def _save(path, enc):
  meta = {"where": enc.where, "unit": enc.unit, "skipped": enc.skipped,
          "label_names": enc.label_names, "version": CACHE_VERSION}
  arrays = dict(offsets=enc.offsets, rows=enc.rows,
                meta=np.asarray(json.dumps(meta)))
  for group in _GROUPS:
    arrays.update({f"{group}.{k}": v for k, v in getattr(enc, group).items()})
  if enc.labels is not None:
    arrays["labels"] = enc.labels
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Write then rename: a reader (another host, a crash) never sees half a file.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _load(path):
  with np.load(path, allow_pickle=False) as f:
    meta = json.loads(str(f["meta"]))
    if meta.get("version") != CACHE_VERSION:
      return None
    names = meta["label_names"]
    groups = {g: {k.split(".", 1)[1]: f[k] for k in f.files
                  if k.startswith(g + ".")} for g in _GROUPS}
    return Encoded(
        offsets=f["offsets"], rows=f["rows"],
        labels=f["labels"] if "labels" in f.files else None,
        where=meta["where"], unit=meta["unit"], skipped=meta["skipped"],
        label_names=tuple(names) if names is not None else None, **groups)


def cache_key(**parts):
  """Returns a hex hash of JSON-serialisable keyword parts."""
  blob = json.dumps(parts, sort_keys=True, default=list)
  return hashlib.sha256(blob.encode()).hexdigest()


def encode_split(source, tokenizer, task, bad_rows, max_length,
                 require_labels, cache_dir, tokenizer_hash=None):
  """Reads and featurises one split for `task`, or loads it from the cache.

  Args:
    source: a `research.data.sources` source (LocalFile, TfdsSplit, HfSplit).
    tokenizer: a Hugging Face fast tokenizer.
    task: the run's task (`research.tasks`): its `columns()` say what to
      read, `featurize(raw, tokenizer, max_length, policy)` makes the
      features, `cache_key()` names its featuriser and options.
    bad_rows: "error" or "skip".
    max_length: truncation length.
    require_labels: a missing label column is an error (training splits).
    cache_dir: where .npz files go; None or "" disables the cache.
    tokenizer_hash: `tokenizer_fingerprint(tokenizer)`, if already computed.

  Returns:
    An `Encoded` split.
  """
  columns = task.columns()
  path = None
  if cache_dir:
    key = cache_key(
        version=CACHE_VERSION, source=source.identity(), columns=columns,
        task=task.cache_key(), bad_rows=bad_rows, max_length=max_length,
        require_labels=require_labels,
        tokenizer=tokenizer_hash or tokenizer_fingerprint(tokenizer))
    path = os.path.join(cache_dir, f"tokens-{key[:24]}.npz")
    if os.path.exists(path):
      try:
        enc = _load(path)
      except (OSError, ValueError, KeyError) as e:
        logging.warning("Ignoring unreadable cache file %s (%s)", path, e)
        enc = None
      if enc is not None:
        logging.info("Loaded %s from the cache %s", enc.where, path)
        return enc
  raw = source.read(bad_rows=bad_rows, require_labels=require_labels,
                    **columns)
  if not raw.rows:
    raise DataError(f"{raw.where}: no usable rows" + (
        f" (skipped: {raw.skipped})" if raw.skipped else ""))
  policy = RowPolicy(bad_rows, raw.where, raw.unit)
  enc = task.featurize(raw, tokenizer, max_length, policy)
  skipped = collections.Counter(raw.skipped)
  skipped.update(policy.counts)
  enc.skipped = dict(skipped)
  if not len(enc):
    raise DataError(f"{raw.where}: no usable rows (skipped: {enc.skipped})")
  if path:
    _save(path, enc)
    logging.info("Tokenised %s (%d examples, %d features) into %s",
                 raw.where, len(raw.rows), len(enc), path)
  return enc


def encode_texts(raw, tokenizer, max_length):
  """The sequence-level features of a raw split: one per row.

  Args:
    raw: a `sources.RawSplit` of one or two text columns.
    tokenizer: a Hugging Face fast tokenizer.
    max_length: the truncation length.

  Returns:
    An `Encoded` with input_ids and token_type_ids, the raw labels per row.
  """
  input_ids, token_type_ids, offsets = encode(tokenizer, raw.texts, max_length)
  return Encoded(
      offsets=offsets,
      tokens={"input_ids": input_ids, "token_type_ids": token_type_ids},
      features={},
      labels=np.asarray(raw.labels, str) if raw.labels is not None else None,
      rows=np.asarray(raw.rows, np.int32), where=raw.where, unit=raw.unit,
      skipped=raw.skipped, label_names=raw.label_names)


def words(tokenizer, text):
  """The words of a raw text as the tokenizer splits them, with their spans.

  The fast tokenizer's pre-tokenizer (BERT: whitespace and punctuation), so
  that words are what its word_ids() count; without one, runs of
  non-space characters.

  Returns:
    [(word, start, end)]: `text[start:end] == word`, in order.
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  pre = getattr(backend, "pre_tokenizer", None)
  if pre is None:
    import re  # pylint: disable=import-outside-toplevel
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
  out = []
  for _, (start, end) in pre.pre_tokenize_str(text):
    # Byte-level BPE pieces carry their leading space.
    while start < end and text[start].isspace():
      start += 1
    if start < end:
      out.append((text[start:end], start, end))
  return out
