"""A served model: a run's task, tokenizer and backend behind the batcher.

    engine = load("/tmp/quickstart")                 # a research.train workdir
    engine = load("/tmp/quickstart_onnx")            # a research.export directory
    engine = load("/tmp/quickstart", backend="onnx") # the run, exported on the fly
    engine = load("/tmp/ensemble")                   # research.soup --ensemble_out
    engine.start(); engine.wait_ready()
    engine.predict([{"text": "a warm, funny film"}])  # [{"label": ..., ...}]

What a request means is the task's business (`Task.serve_fields`,
`serve_features`, `serve_result`); the engine applies the server's limits
(characters per text, rows per input), runs the rows through the dynamic
batcher (`batching.DynamicBatcher`) and says what was cut (`truncated`,
`notes`). `start` compiles every padded shape in the background; `ready`
turns true when all are compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading

from research.data.batching import make_buckets
from research.serve import batching
from research.tasks.common import ServeInputError

log = logging.getLogger("research.serve")
SERVE_JSON = "serve.json"  # an export directory's description
# Requests with more characters than this are tokenised in a worker thread.
_ON_LOOP_CHARS = 20_000
BACKENDS = ("jax", "onnx")


@dataclasses.dataclass
class Limits:
  """What one request may ask (bad input: a 4xx naming the limit).

  Attributes:
    max_inputs: inputs per /predict request.
    max_chars: characters per text; a longer text is cut there (the answer
      says `truncated`).
    max_rows_per_input: model rows per input (QA windows); more are cut.
    max_body_bytes: request body size (413 above).
    max_explain_inputs: inputs per /explain request.
    explain_samples: SHAP evaluations and LIME samples per input, default.
    max_explain_samples: the most a request may ask.
    ig_steps: integrated-gradients steps (fixed: one compilation per bucket).
  """
  max_inputs: int = 64
  max_chars: int = 100_000
  max_rows_per_input: int = 16
  max_body_bytes: int = 4 << 20
  max_explain_inputs: int = 4
  explain_samples: int = 200
  max_explain_samples: int = 2000
  ig_steps: int = 32


@dataclasses.dataclass
class Batching:
  """Dynamic batching (`batching.DynamicBatcher`).

  Attributes:
    max_batch: rows per model call.
    max_wait_ms: how long a request waits for others to batch with.
    batch_sizes: padded batch sizes (empty: 1, 2, 4, ... max_batch).
    buckets: padded lengths (empty: the run's data.buckets and max_length).
    call_cost: a model call's fixed cost in padded tokens: how the rows
      taken together are cut into calls (`DynamicBatcher.plan`).
  """
  max_batch: int = 32
  max_wait_ms: float = 2.0
  batch_sizes: tuple = ()
  buckets: tuple = ()
  call_cost: int = 16


class SerializedTokenizer:
  """A tokenizer whose calls run one at a time.

  A transformers fast tokenizer's call sets truncation on the shared Rust
  tokenizer and then encodes, so two threads calling with different
  settings (truncated, and again untruncated to see what was cut) can
  encode with each other's: a request's row came back longer than
  max_length under concurrent load. Everything else is forwarded.
  """

  def __init__(self, tokenizer):
    inner = getattr(tokenizer, "serialized_inner", tokenizer)
    self.__dict__.update(serialized_inner=inner,
                         serialized_lock=threading.Lock())

  def __call__(self, *args, **kwargs):
    with self.serialized_lock:
      return self.serialized_inner(*args, **kwargs)

  def __getattr__(self, name):  # only for what __dict__ lacks
    return getattr(self.serialized_inner, name)

  def __len__(self):
    return len(self.serialized_inner)


class Engine:
  """A servable model; see the module docstring.

  Args:
    task: the run's task (its tokenizer set).
    backend: a `backends` callable.
    label_names: the run's label names.
    version: the model version recorded with every prediction.
    max_length: the run's data.max_length.
    buckets: the run's data.buckets.
    model: the restored nnx model (integrated gradients), or None.
    limits, batching_options: `Limits`, `Batching`.
    summary: the run's summary.json (`Task.serve_setup`).
    explain_methods: the /explain methods to offer (None: every one the
      task and backend allow; empty: no /explain, a quicker start-up).
  """

  def __init__(self, task, backend, *, label_names, version, max_length,
               buckets=(), model=None, limits=None, batching_options=None,
               summary=None, explain_methods=None):
    self.task = task
    task.tokenizer = SerializedTokenizer(task.tokenizer)
    self.tokenizer = task.tokenizer
    self.backend = backend
    self.label_names = tuple(str(n) for n in label_names or ())
    self.version = version
    self.max_length = int(max_length)
    self.model = model
    self.limits = limits or Limits()
    b = batching_options or Batching()
    self.buckets = make_buckets(tuple(b.buckets) or tuple(buckets),
                                self.max_length)
    task.serve_setup(summary or {})
    self.fields = task.serve_fields()
    self.batch_listeners = []  # on_batch callbacks (metrics)
    self.batcher = batching.DynamicBatcher(
        backend, self.buckets,
        tuple(b.batch_sizes) or batching.default_batch_sizes(b.max_batch),
        max_wait_s=b.max_wait_ms / 1000, pad_id=task.pad_id,
        on_batch=self._on_batch, call_cost=b.call_cost)
    from research.serve import explain  # pylint: disable=import-outside-toplevel
    self.explainer = None
    if task.EXPLAINABLE and (explain_methods is None or explain_methods):
      self.explainer = explain.Explainer(self, explain_methods)
    self.compiled = 0
    self.shapes = len(self.buckets) * len(self.batcher.batch_sizes)
    self._ready = threading.Event()
    self._warmup = None
    self.error = None

  @property
  def task_name(self) -> str:
    return self.task.name

  @property
  def traces(self) -> int:
    """Compilations of the model so far (0 for onnxruntime)."""
    return getattr(self.backend, "traces", 0)

  def _on_batch(self, *args):
    for listener in self.batch_listeners:
      listener(*args)

  # --- Start-up ----------------------------------------------------------------

  def start(self, block: bool = False):
    """Starts the batcher and compiles every shape (in the background
    unless `block`); `ready` turns true when done. Idempotent."""
    self.batcher.start()
    if self._warmup is None:
      self._warmup = threading.Thread(target=self._compile_all, daemon=True,
                                      name="warmup")
      self._warmup.start()
    if block:
      self.wait_ready()

  def _compile_all(self):
    try:
      def progress(done, total):
        self.compiled = done
        log.info("compiled %d/%d shapes", done, total)
      self.batcher.warmup(progress)
      if self.explainer is not None:
        self.explainer.warmup()
      self._ready.set()
      log.info("ready: %s (%s, %d shapes)", self.version, self.backend.name,
               self.shapes)
    except Exception as e:  # pylint: disable=broad-except
      self.error = e
      log.exception("warm-up failed")

  @property
  def ready(self) -> bool:
    return self._ready.is_set()

  def wait_ready(self, timeout=None):
    """Blocks until every shape is compiled; raises the warm-up's error."""
    while not self._ready.wait(1.0 if timeout is None else timeout):
      if self.error is not None:
        raise RuntimeError(f"warm-up failed: {self.error}") from self.error
      if timeout is not None:
        raise TimeoutError(f"not ready after {timeout} s")
    return True

  def close(self):
    self.batcher.close()

  # --- Requests -----------------------------------------------------------------

  def clip(self, items):
    """Items with every text checked and cut to max_chars; notes per item."""
    out, notes = [], []
    limit = self.limits.max_chars
    for i, item in enumerate(items):
      item, note = dict(item), []
      for name, value in item.items():
        if isinstance(value, str):
          _check_text(value, f"inputs[{i}].{name}")
          if len(value) > limit:
            item[name] = value[:limit]
            note.append(f"{name}: cut to its first {limit} of {len(value)} "
                        "characters (limit max_chars)")
        elif isinstance(value, list):
          for j, word in enumerate(value):
            _check_text(word, f"inputs[{i}].{name}[{j}]", allow_blank=True)
          lengths = [len(w) + 1 for w in value]
          if sum(lengths) > limit:
            keep = sum(1 for total in _cumsum(lengths) if total <= limit)
            item[name] = value[:keep]
            note.append(f"{name}: cut to its first {keep} of {len(value)} "
                        f"words ({limit} characters, limit max_chars)")
      out.append(item)
      notes.append(note)
    return out, notes

  def encode(self, items) -> list:
    """Items (dicts of `fields`) -> (`ServeFeatures`, notes) per item.

    Raises:
      ServeInputError: an input the task cannot take (a 422).
    """
    items, notes = self.clip(items)
    features = self.task.serve_features(items, self.max_length)
    cap = self.limits.max_rows_per_input
    for f, note in zip(features, notes):
      if f.truncated:
        note.append(f"the model reads {self.max_length} tokens "
                    "(data.max_length); the rest was not read")
      if len(f.rows) > cap:
        note.append(f"read its first {cap} of {len(f.rows)} windows (limit "
                    "max_rows_per_input)")
        f.rows = f.rows[:cap]
        f.truncated = True
      f.truncated = f.truncated or bool(note)
    return list(zip(features, notes))

  def run(self, rows) -> list:
    """Model outputs of rows (dicts with input_ids, token_type_ids),
    through the batcher; blocks. Each row's outputs are shaped as the
    model's: an array, or a tuple of arrays (QA's start and end)."""
    return [o[0] if len(o) == 1 else o for o in self.batcher.run(rows)]

  def predict(self, items) -> list:
    """Answers of items: the task's result plus `truncated` and `notes`.

    Blocks (call it from a worker thread in a server).
    """
    encoded = self.encode(items)
    return self.decode(encoded, self.run(
        [row for f, _ in encoded for row in f.rows]))

  async def predict_async(self, items) -> list:
    """`predict` for an event loop: small inputs are encoded and decoded
    on the loop (no thread hop; a fraction of a millisecond), large ones
    in a worker thread; the model call is awaited."""
    import asyncio  # pylint: disable=import-outside-toplevel
    from starlette.concurrency import run_in_threadpool  # pylint: disable=import-outside-toplevel
    large = sum(len(v) if isinstance(v, str) else sum(map(len, v))
                for item in items for v in item.values()
                if isinstance(v, (str, list))) > _ON_LOOP_CHARS
    if large:
      return await run_in_threadpool(self.predict, items)
    encoded = self.encode(items)
    outputs = await asyncio.wrap_future(self.batcher.submit(
        [row for f, _ in encoded for row in f.rows]))
    return self.decode(encoded, [o[0] if len(o) == 1 else o for o in outputs])

  def decode(self, encoded, outputs) -> list:
    """Each item's answer from its rows' outputs (`run`'s, in row order)."""
    results, start = [], 0
    for f, notes in encoded:
      part = outputs[start:start + len(f.rows)]
      start += len(f.rows)
      results.append({"truncated": f.truncated, "notes": notes,
                      **self.task.serve_result(part, f, self.label_names)})
    return results

  def info(self) -> dict:
    """What /model describes."""
    return {"model_version": self.version, "task": self.task_name,
            "backend": self.backend.name, "labels": list(self.label_names),
            "max_length": self.max_length, "buckets": list(self.buckets),
            "batch_sizes": list(self.batcher.batch_sizes),
            "explain": (self.explainer.methods if self.explainer else []),
            "limits": dataclasses.asdict(self.limits)}


def _cumsum(values):
  total = 0
  for v in values:
    total += v
    yield total


def _check_text(value: str, where: str, allow_blank: bool = False):
  if not allow_blank and not value.strip():
    raise ServeInputError(f"{where} is empty")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ServeInputError(
        f"{where} is not valid Unicode: {value[e.start]!r} at character "
        f"{e.start} (a lone surrogate)") from e


# --- Loading --------------------------------------------------------------------


def use_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`: a restarted server
  (or another replica) reads its compiled shapes instead of compiling."""
  if directory:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", directory)


def params_digest(params) -> str:
  """The first 12 hex digits of a sha256 over every trained weight."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:12]


def _read_json(path, default=None):
  if not os.path.exists(path):
    return default
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def from_workdir(workdir, *, which="best", backend="jax", limits=None,
                 batching_options=None, onnx_dir=None,
                 explain_methods=None) -> Engine:
  """The engine of a research.train run (`restore.restore_run`).

  Args:
    workdir: the run's workdir.
    which: "best" or "latest" checkpoint.
    backend: "jax" (the restored model, jitted) or "onnx" (exported into
      `onnx_dir`, default <workdir>/serve_onnx, then onnxruntime).
    limits, batching_options, explain_methods: `Engine`'s.
  """
  from research import data, restore  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  from research.serve import backends  # pylint: disable=import-outside-toplevel
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; valid: {', '.join(BACKENDS)}")
  config = restore.read_config(workdir)
  tokenizer = data.load_tokenizer(str(hf.resolve(config.model.name)))
  restored = restore.restore_run(workdir, which, tokenizer)
  version = (f"{os.path.basename(os.path.normpath(workdir))}:{restored.which}"
             f"@{restored.step}:{params_digest(restored.params)}")
  label_names = data.load_label_names(os.path.join(workdir, "labels.json"))
  if backend == "jax":
    be = backends.JaxBackend(restored.task, restored.graphdef,
                             restored.params, restored.frozen)
  else:
    from research import export_formats  # pylint: disable=import-outside-toplevel
    out = onnx_dir or os.path.join(workdir, "serve_onnx")
    export_formats.export_restored(restored, workdir, out, "onnx",
                                   version=version)
    be = backends.OnnxBackend(os.path.join(out, export_formats.ONNX_FILE))
  return Engine(restored.task, be, label_names=label_names, version=version,
                max_length=config.data.max_length,
                buckets=tuple(config.data.buckets), model=restored.model,
                limits=limits, batching_options=batching_options,
                summary=_read_json(os.path.join(workdir, "summary.json"), {}),
                explain_methods=explain_methods)


def from_export(export_dir, *, limits=None, batching_options=None,
                explain_methods=None) -> Engine:
  """The engine of a `research.export --format onnx|stablehlo` directory
  (no checkpoint needed; no integrated gradients: no JAX model)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from research import data, export_formats, tasks  # pylint: disable=import-outside-toplevel
  from research.serve import backends  # pylint: disable=import-outside-toplevel
  meta = _read_json(os.path.join(export_dir, SERVE_JSON))
  if meta is None:
    raise FileNotFoundError(f"{export_dir}: no {SERVE_JSON}; is it a "
                            "research.export --format onnx|stablehlo "
                            "directory?")
  config = ml_collections.ConfigDict(meta["config"])
  tokenizer = data.load_tokenizer(str(export_dir))
  task = tasks.load(config, tokenizer)
  if meta["format"] == "onnx":
    be = backends.OnnxBackend(os.path.join(export_dir, meta["file"]))
  else:
    be = backends.ExportedBackend(*export_formats.read_stablehlo(export_dir))
  return Engine(task, be, label_names=meta["label_names"],
                version=meta["version"], max_length=config.data.max_length,
                buckets=tuple(config.data.buckets), limits=limits,
                batching_options=batching_options, summary=meta["summary"],
                explain_methods=explain_methods)


def from_ensemble(ensemble_dir, *, backend="jax", limits=None,
                  batching_options=None, explain_methods=None) -> Engine:
  """The engine of an ensemble directory (`research.soup.write_ensemble`):
  every member's forward on each batch, their outputs averaged
  (`backends.EnsembleBackend`). No integrated gradients (no one model)."""
  from research import soup  # pylint: disable=import-outside-toplevel
  from research.serve import backends  # pylint: disable=import-outside-toplevel
  if backend != "jax":
    raise ValueError(f"{ensemble_dir}: an ensemble serves with --backend=jax "
                     f"(its members' restored models), not {backend!r}")
  runs = soup.read_ensemble(ensemble_dir)
  first = runs[0]
  be = backends.EnsembleBackend([
      backends.JaxBackend(r.task, r.graphdef, r.params, r.frozen)
      for r in runs])
  digest = params_digest([r.params for r in runs])
  version = (f"ensemble:{os.path.basename(os.path.normpath(ensemble_dir))}"
             f"x{len(runs)}:{digest}")
  config = first.config
  return Engine(first.task, be, label_names=first.label_names,
                version=version, max_length=config.data.max_length,
                buckets=tuple(config.data.buckets), limits=limits,
                batching_options=batching_options,
                summary=_read_json(os.path.join(first.workdir, "summary.json"),
                                   {}),
                explain_methods=explain_methods)


def load(path, *, backend="jax", which="best", **kwargs) -> Engine:
  """`from_export` for an export directory, `from_ensemble` for an ensemble
  directory (ensemble.json), else `from_workdir`."""
  from research import soup  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, SERVE_JSON)):
    kwargs.pop("onnx_dir", None)
    return from_export(path, **kwargs)
  if soup.is_ensemble(path):
    kwargs.pop("onnx_dir", None)
    return from_ensemble(path, backend=backend, **kwargs)
  return from_workdir(path, which=which, backend=backend, **kwargs)
