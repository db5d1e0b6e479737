"""Pre-training corpora: text -> fixed-length token rows on disk -> grain batches.

Build once, read many times:

  tokenizer = data.load_tokenizer(str(hf.resolve("all-minilm-l6-v2")))
  info = corpus.build_corpus(corpus.TextFiles(["wiki.train.tokens"]),
                             tokenizer, "/tmp/wiki_rows", seq_len=128)
  rows = corpus.Corpus("/tmp/wiki_rows")
  it = rows.iterator(batch_size=256, seed=0)       # this process's batches
  batch = next(it)  # {"input_ids": int32 [B / P, 128], "attention_mask": ...}
  state = it.get_state()  # save with the model; it.set_state(state) resumes

Sources (`TextFiles`, `JsonLines`, `TfdsCorpus`, `HfCorpus`) stream their text
as segments; `build_corpus` tokenises them in batches of about `chunk_chars`
characters with the Hugging Face fast tokenizer, packs the tokens into rows
`[CLS] tokens [SEP] [PAD]...` of `seq_len`, and writes the rows to ArrayRecord
shards as it goes, so memory stays bounded whatever the corpus size.

Packing (`packing=`):
  "full": RoBERTa's FULL-SENTENCES. Documents follow each other in the token
    stream with one [SEP] between them and rows are cut every `seq_len - 2`
    tokens; a document may continue on the next row. Only the last row is
    padded. A separator is never the first or last token of a row's content.
  "doc": RoBERTa's DOC-SENTENCES. A row never holds two documents: a long
    document fills several rows, and the last row of each document is padded.

Why ArrayRecord: it is the random-access format grain reads natively
(`grain.sources.ArrayRecordDataSource`) and the one `tfds.data_source` uses, so
a global shuffle, process sharding and a checkpointable position are grain's
own code and need nothing of ours. `.npy` shards would be simpler locally, but
memory-mapping them ties the reader to a local file system. Records are
written with `group_size:1` so that reading one row decodes one row.

Text is tokenised with `split_special_tokens=True`: a literal "[SEP]" or
"[MASK]" in the corpus is text, never a special token, so `attention_mask =
input_ids != pad_id` and "is special" are exact functions of the ids.
"""

import dataclasses
import itertools
import json
import os
import shutil
import tempfile

import numpy as np

from research.data.errors import DataError
from research.data.sources import file_sha256
from research.data.tokenize import cache_key
from research.data.tokenize import tokenizer_fingerprint

PACKINGS = ("full", "doc")
DOCUMENT_SPLITS = ("line", "blank_line")
META_FILE = "corpus.json"
CORPUS_VERSION = 1
# A "line" longer than this is not text: a binary file, or one without
# newlines, whose line would otherwise have to be held whole in memory.
MAX_LINE_BYTES = 64 << 20
_WRITER_OPTIONS = "group_size:1"  # One record per chunk: random access.


def _decode(raw, where):
  """Decodes one line strictly; a binary or non-UTF-8 line names its place."""
  if b"\0" in raw:
    raise DataError(f"{where}: contains a NUL byte: not a text file (binary "
                    "or UTF-16?); the corpus must be UTF-8 text")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not valid UTF-8 (byte {e.start}: "
                    f"{raw[e.start:e.start + 4]!r}); the corpus must be "
                    "UTF-8 text") from None


def _lines(path):
  """Yields (line number, bytes without the newline), bounded per line."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  with open(path, "rb") as f:
    for number in itertools.count(1):
      raw = f.readline(MAX_LINE_BYTES + 1)
      if not raw:
        return
      if len(raw) > MAX_LINE_BYTES:
        raise DataError(f"{path}, line {number}: longer than "
                        f"{MAX_LINE_BYTES >> 20} MiB: not a text file of "
                        "lines (binary data?)")
      if number == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark.
      yield number, raw.rstrip(b"\r\n")


class TextFiles:
  """Plain UTF-8 text files.

  Args:
    paths: one path or a list of paths, read in order.
    documents: "line" (each non-empty line is a document) or "blank_line"
      (documents are separated by blank lines; their lines are tokenised one
      by one and joined, so a document of any length needs no more memory
      than a line).
  """

  def __init__(self, paths, documents="line"):
    self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else \
        list(paths)
    if documents not in DOCUMENT_SPLITS:
      raise DataError(f"documents must be one of {DOCUMENT_SPLITS}, got "
                      f"{documents!r}")
    self.documents = documents
    self.where = ", ".join(map(str, self.paths))

  def identity(self):
    """Returns what the corpus cache key is built from."""
    for path in self.paths:
      if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    return {"source": "text", "documents": self.documents,
            "files": [[os.path.abspath(p), file_sha256(p)]
                      for p in self.paths]}

  def segments(self):
    """Yields (text, starts_document) for every non-blank line."""
    for path in self.paths:
      new_doc = True  # A file always starts a document.
      for number, raw in _lines(path):
        text = _decode(raw, f"{path}, line {number}")
        if not text.strip():
          new_doc = True
          continue
        yield text, new_doc
        new_doc = self.documents == "line"


class JsonLines:
  """JSON-lines files with one document per object in `text_field`.

  Args:
    paths: one path or a list of paths.
    text_field: the field holding the document's text.
  """

  def __init__(self, paths, text_field="text"):
    self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else \
        list(paths)
    self.text_field = text_field
    self.where = ", ".join(map(str, self.paths))

  def identity(self):
    """Returns what the corpus cache key is built from."""
    for path in self.paths:
      if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    return {"source": "jsonl", "text_field": self.text_field,
            "files": [[os.path.abspath(p), file_sha256(p)]
                      for p in self.paths]}

  def segments(self):
    """Yields (text, True) per object; bad lines raise naming file and line."""
    for path in self.paths:
      for number, raw in _lines(path):
        where = f"{path}, line {number}"
        line = _decode(raw, where)
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
          raise DataError(f"{where}: expected one JSON object per line")
        yield _field_text(record, self.text_field, where, record.keys()), True


def _field_text(record, field, where, fields):
  """The document text of one record, or a DataError naming the field."""
  if field not in record:
    raise DataError(f"{where}: no field {field!r} (the fields are "
                    f"{sorted(fields)}); set text_field")
  text = record[field]
  if isinstance(text, bytes):
    text = _decode(text, where)
  if not isinstance(text, str):
    raise DataError(f"{where}: field {field!r} is "
                    f"{type(text).__name__}, not text")
  return text


class TfdsCorpus:
  """One split of a TFDS text dataset ("wikipedia/20230601.en", "lm1b").

  Streams the examples (tfds.as_numpy over a tf.data pipeline), so the split
  never has to fit in memory.
  """

  def __init__(self, name, split="train", text_field="text", data_dir=None):
    self.name = name
    self.split = split
    self.text_field = text_field
    self.data_dir = data_dir or None
    self.where = f"tfds {name} split {split!r}"

  def _builder(self):
    import tensorflow_datasets as tfds  # Heavy; only for this source.
    try:
      return tfds.builder(self.name, data_dir=self.data_dir)
    except Exception as e:
      raise DataError(f"{self.where}: cannot open the dataset "
                      f"({str(e).splitlines()[0]})") from e

  def identity(self):
    """Returns what the corpus cache key is built from."""
    return {"source": "tfds", "name": self.name,
            "version": str(self._builder().version), "split": self.split,
            "text_field": self.text_field}

  def segments(self):
    """Yields (text, True) per example."""
    import tensorflow_datasets as tfds
    builder = self._builder()
    fields = list(builder.info.features.keys())
    if self.text_field not in fields:
      raise DataError(f"{self.where}: no field {self.text_field!r} (the "
                      f"fields are {fields}); set text_field")
    try:
      ds = builder.as_dataset(split=self.split)
    except Exception as e:
      raise DataError(f"{self.where}: cannot load ({e})") from e
    for number, example in enumerate(tfds.as_numpy(ds), 1):
      yield _field_text(example, self.text_field, f"{self.where}, row "
                        f"{number}", fields), True


class HfCorpus:
  """A Hugging Face dataset split, loaded by name or given as an object.

  Args:
    name: the dataset ("wikipedia", or a builder such as "json"); ignored
      when `dataset` is given.
    config: the dataset config ("20220301.en") or None.
    split: the split name.
    text_field: the column holding each document's text.
    data_files: passed to `datasets.load_dataset` (local files).
    streaming: stream from the hub instead of downloading first.
    dataset: an already loaded `datasets.Dataset` or `IterableDataset`.
  """

  def __init__(self, name="", config=None, split="train", text_field="text",
               data_files=None, streaming=False, dataset=None):
    self.name, self.config, self.split = name, config or None, split
    self.text_field = text_field
    self.data_files = data_files
    self.streaming = streaming
    self._dataset = dataset
    self.where = (f"hf {name}" + (f"/{config}" if config else "") +
                  f" split {split!r}") if dataset is None else \
        f"hf dataset {getattr(dataset, '_fingerprint', '')}".strip()

  def _load(self):
    if self._dataset is None:
      import datasets  # Heavy; only for this source.
      try:
        self._dataset = datasets.load_dataset(
            self.name, self.config, split=self.split,
            data_files=self.data_files, streaming=self.streaming)
      except Exception as e:
        raise DataError(f"{self.where}: cannot load ({e})") from e
    return self._dataset

  def identity(self):
    """Returns what the corpus cache key is built from."""
    ds = self._load()
    return {"source": "hf", "name": self.name, "config": self.config,
            "split": self.split, "text_field": self.text_field,
            "fingerprint": getattr(ds, "_fingerprint", None),
            "streaming": self.streaming}

  def segments(self):
    """Yields (text, True) per row, reading 1000 rows at a time."""
    ds = self._load()
    fields = list(ds.column_names or [])
    if fields and self.text_field not in fields:
      raise DataError(f"{self.where}: no column {self.text_field!r} (the "
                      f"columns are {fields}); set text_field")
    number = 0
    for batch in ds.iter(batch_size=1000):
      for text in batch[self.text_field]:
        number += 1
        yield _field_text({self.text_field: text}, self.text_field,
                          f"{self.where}, row {number}", fields), True


@dataclasses.dataclass
class CorpusInfo:
  """What `build_corpus` wrote (the content of `corpus.json`)."""
  directory: str
  shards: list
  num_rows: int
  num_tokens: int      # text tokens, separators and specials not counted
  num_documents: int
  seq_len: int
  packing: str
  dtype: str
  pad_id: int
  cls_id: int
  sep_id: int
  sources: list
  key: str


class _RowPacker:
  """Packs token segments into [CLS] content [SEP] [PAD]... rows."""

  def __init__(self, seq_len, packing, tokenizer, dtype, write):
    self.capacity = seq_len - 2
    self.packing = packing
    self.cls, self.sep, self.pad = (tokenizer.cls_token_id,
                                    tokenizer.sep_token_id,
                                    tokenizer.pad_token_id)
    self.content = np.empty(self.capacity, dtype)
    self.row = np.full(seq_len, self.pad, dtype)
    self.n = 0
    self.write = write
    self.num_rows = 0

  def start_document(self):
    if self.n == 0:
      return
    if self.packing == "doc" or self.n >= self.capacity - 1:
      self.flush()  # No room for a separator and a token after it.
    else:
      self.content[self.n] = self.sep
      self.n += 1

  def add(self, tokens):
    while len(tokens):
      take = min(self.capacity - self.n, len(tokens))
      self.content[self.n:self.n + take] = tokens[:take]
      self.n += take
      tokens = tokens[take:]
      if self.n == self.capacity:
        self.flush()

  def flush(self):
    if self.n == 0:
      return
    self.row[:] = self.pad
    self.row[0] = self.cls
    self.row[1:self.n + 1] = self.content[:self.n]
    self.row[self.n + 1] = self.sep
    self.write(self.row.tobytes())
    self.num_rows += 1
    self.n = 0


class _ShardWriter:
  """Writes records to ArrayRecord shards of at most `rows_per_shard`."""

  def __init__(self, directory, rows_per_shard):
    self.directory = directory
    self.rows_per_shard = rows_per_shard
    self.shards = []
    self._writer = None
    self._count = 0

  def write(self, record):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if self._writer is None or self._count == self.rows_per_shard:
      self.close()
      name = f"rows-{len(self.shards):05d}.array_record"
      self._writer = array_record_module.ArrayRecordWriter(
          os.path.join(self.directory, name), _WRITER_OPTIONS)
      self.shards.append(name)
      self._count = 0
    self._writer.write(record)
    self._count += 1

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _tokenize_chunk(tokenizer, texts, dtype):
  """Returns (flat ids, offsets) of texts tokenised in one batched call."""
  ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                  return_attention_mask=False,
                  return_token_type_ids=False, verbose=False)["input_ids"]
  lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
  offsets = np.zeros(len(ids) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  flat = np.fromiter(itertools.chain.from_iterable(ids), dtype,
                     count=int(offsets[-1]))
  return flat, offsets


def read_info(directory):
  """Returns the `CorpusInfo` of a built corpus, or None if there is none."""
  path = os.path.join(directory, META_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.pop("version", None) != CORPUS_VERSION:
    return None
  return CorpusInfo(directory=directory, **meta)


def build_corpus(sources, tokenizer, directory, *, seq_len=128,
                 packing="full", chunk_chars=1 << 20, rows_per_shard=1 << 16):
  """Tokenises sources into fixed-length rows in ArrayRecord shards, once.

  The directory is reused when its `corpus.json` was built from the same
  sources (file contents hashed), tokenizer, `seq_len` and `packing`; it is
  written to a temporary sibling and renamed, so a killed build leaves no
  half corpus behind.

  Several JAX processes: build on each host's local disk (the result is the
  same everywhere) or on process 0 into shared storage before the others open
  it; two builders must not share a directory.

  Args:
    sources: a source or a list of them (`TextFiles`, `JsonLines`,
      `TfdsCorpus`, `HfCorpus`), read in order.
    tokenizer: a Hugging Face fast tokenizer with [CLS]/[SEP]/[PAD] tokens.
    directory: where the shards and `corpus.json` go (a local file system).
    seq_len: tokens per row, [CLS] and [SEP] included (e.g. 128 or 512).
    packing: "full" (documents share rows, [SEP] between them) or "doc"
      (one document per row, padded). See the module docstring.
    chunk_chars: characters per tokenizer call; with `seq_len` and one
      shard writer this bounds the memory.
    rows_per_shard: rows per ArrayRecord file.

  Returns:
    The `CorpusInfo`.

  Raises:
    DataError: no text in the sources, a bad line (named by file and line),
      a bad argument.
  """
  sources = sources if isinstance(sources, (list, tuple)) else [sources]
  if packing not in PACKINGS:
    raise DataError(f"packing must be one of {PACKINGS}, got {packing!r}")
  if not isinstance(seq_len, int) or seq_len < 4:
    raise DataError(f"seq_len must be an int >= 4, got {seq_len!r}")
  for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
    if getattr(tokenizer, name, None) is None:
      raise DataError(f"the tokenizer has no {name}; pre-training rows need "
                      "[CLS], [SEP] and [PAD] tokens")
  key = cache_key(version=CORPUS_VERSION, seq_len=seq_len, packing=packing,
                  sources=[s.identity() for s in sources],
                  tokenizer=tokenizer_fingerprint(tokenizer))
  info = read_info(directory)
  if info is not None and info.key == key:
    return info
  dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else \
      np.int32
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".corpus-tmp-")
  try:
    writer = _ShardWriter(tmp, rows_per_shard)
    packer = _RowPacker(seq_len, packing, tokenizer, dtype, writer.write)
    num_tokens = num_docs = 0
    texts, starts, chars = [], [], 0

    def tokenise_pending():
      nonlocal num_tokens, num_docs
      flat, offsets = _tokenize_chunk(tokenizer, texts, dtype)
      for i, new_doc in enumerate(starts):
        tokens = flat[offsets[i]:offsets[i + 1]]
        if new_doc:
          packer.start_document()
          num_docs += 1
        packer.add(tokens)
      num_tokens += len(flat)
      texts.clear()
      starts.clear()

    for source in sources:
      for text, new_doc in source.segments():
        texts.append(text)
        starts.append(new_doc)
        chars += len(text)
        if chars >= chunk_chars:
          tokenise_pending()
          chars = 0
    if texts:
      tokenise_pending()
    packer.flush()
    writer.close()
    if num_tokens == 0:
      raise DataError(f"{'; '.join(s.where for s in sources)}: empty corpus "
                      "(no text to tokenise)")
    info = CorpusInfo(directory=directory, shards=writer.shards,
                      num_rows=packer.num_rows, num_tokens=num_tokens,
                      num_documents=num_docs, seq_len=seq_len,
                      packing=packing, dtype=np.dtype(dtype).name,
                      pad_id=packer.pad, cls_id=packer.cls, sep_id=packer.sep,
                      sources=[s.where for s in sources], key=key)
    meta = dataclasses.asdict(info)
    del meta["directory"]
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
      json.dump(dict(meta, version=CORPUS_VERSION), f, indent=1)
    if os.path.exists(directory):
      shutil.rmtree(directory)  # A stale build (other sources or settings).
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return info


class _Rows:
  """Grain random-access source: decoded int32 rows, padded past the end."""

  def __init__(self, records, info, length, rows):
    self._records = records
    self._rows = rows
    self._info = info
    self._length = length
    self._dtype = np.dtype(info.dtype)

  def __len__(self):
    return self._length

  def __getitem__(self, index):
    if index >= self._rows:  # Padding of the last eval batch.
      return np.full(self._info.seq_len, self._info.pad_id, np.int32)
    return np.frombuffer(self._records[index], self._dtype).astype(np.int32)


class Corpus:
  """A built corpus, read through grain.

  Args:
    directory: what `build_corpus` wrote.
  """

  def __init__(self, directory):
    from grain import sources as grain_sources  # pylint: disable=g-import-not-at-top
    self.info = read_info(directory)
    if self.info is None:
      raise DataError(f"{directory}: no {META_FILE}; build the corpus with "
                      "research.data.corpus.build_corpus first")
    self.records = grain_sources.ArrayRecordDataSource(
        [os.path.join(directory, s) for s in self.info.shards])

  def __len__(self):
    return self.info.num_rows

  def dataset(self, batch_size, *, seed=0, shuffle=True, num_epochs=None,
              process_index=None, process_count=None, max_rows=None):
    """Returns this process's batches as a random-access `grain.MapDataset`.

    The global stream is every row once per epoch, in an order that is a
    function of (seed, epoch) only (grain's index shuffle, reseeded each
    epoch); global batch s is its rows [s * B, (s + 1) * B), whatever the
    number of processes, and process p holds rows p, p + P, ... of it. So
    `dataset(...)[step]` is the batch of a step, and a resumed run can start
    from the step alone.

    Args:
      batch_size: the global batch size (all processes together).
      seed: the shuffle seed.
      shuffle: False reads the rows in order (evaluation).
      num_epochs: None repeats forever (training). A finite count without
        shuffling pads the last global batch with empty rows (all [PAD],
        attention 0), so that every row is read once and every process has
        the same number of batches.
      process_index: this JAX process (default `jax.process_index()`).
      process_count: the number of processes (default
        `jax.process_count()`).
      max_rows: read only the first `max_rows` rows (e.g. a quick held-out
        evaluation); None: all.

    Returns:
      A `grain.MapDataset` of {"input_ids", "attention_mask"}: int32
      [batch_size // process_count, seq_len].

    Raises:
      DataError: fewer rows than one batch, or a batch that does not divide
        over the processes.
    """
    import grain  # pylint: disable=g-import-not-at-top
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index, process_count = jax.process_index(), jax.process_count()
    where = f"{self.info.directory} (from {'; '.join(self.info.sources)})"
    if batch_size % process_count:
      raise DataError(f"batch_size={batch_size} does not divide over "
                      f"{process_count} processes")
    if shuffle and self.info.num_rows < batch_size:
      raise DataError(f"{where}: {self.info.num_rows} rows of "
                      f"{self.info.seq_len} tokens, fewer than one batch "
                      f"(batch_size={batch_size}); use a larger corpus or a "
                      "smaller batch_size")
    rows = min(self.info.num_rows, max_rows or self.info.num_rows)
    length = rows
    if not shuffle and num_epochs is not None:
      length = -(-length // batch_size) * batch_size
    ds = grain.MapDataset.source(_Rows(self.records, self.info, length, rows))
    if shuffle:
      # Spread nearby seeds: grain reseeds epoch e with seed + e.
      ds = ds.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(
          1)[0]))
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    pad_id = self.info.pad_id
    return ds.batch(batch_size // process_count, drop_remainder=True).map(
        lambda ids: {"input_ids": ids,
                     "attention_mask": (ids != pad_id).astype(np.int32)})

  def iterator(self, batch_size, *, read_options=None, **kwargs):
    """Returns a checkpointable iterator over `dataset(batch_size, **kwargs)`.

    `get_state()` is a small JSON-able dict (the next position);
    `set_state(state)` on a fresh iterator resumes at the same example.

    Args:
      batch_size: the global batch size.
      read_options: a `grain.ReadOptions` (threads, prefetch), or None for
        grain's defaults.
      **kwargs: see `dataset`.
    """
    ds = self.dataset(batch_size, **kwargs)
    return iter(ds.to_iter_dataset(read_options))
