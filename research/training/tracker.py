"""Experiment tracking behind one small interface.

The trainer talks to a `Tracker` only: `log_config` once, `log(step, metrics)`
as it goes, `summary` for final numbers, `finish` at the end. `create_tracker`
gives process 0 a `JsonlTracker` (always: `<workdir>/metrics.jsonl` is the
record a run can be analysed from offline) plus a `WandbTracker`, and every
other process a `NullTracker`, so multi-host runs log once.

Weights & Biases is optional infrastructure, never a reason to stop training:
any exception from it (no network, a bad key, a full disk under its
directory) steps the tracker down online -> offline -> disabled with a
warning, while metrics.jsonl keeps being written.
"""

import abc
import json
import math
import os
import tempfile
import warnings

import numpy as np

METRICS_FILE = "metrics.jsonl"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _to_python(key, value):
  """A JSON-friendly Python scalar from a Python, numpy or jax scalar."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  array = np.asarray(value)  # jax arrays are copied to the host here
  if array.size != 1:
    raise ValueError(
        f"Metric {key!r} must be a scalar, got an array of shape "
        f"{array.shape}.")
  array = array.reshape(())
  kind = array.dtype.kind
  if kind == "b":
    return bool(array)
  if kind in "iu":
    return int(array)
  if kind in "US":
    return str(array)
  return float(array)  # covers bfloat16 (kind "V"), which .item() does not


def to_python(values):
  """Converts a flat dict of scalars to plain Python values.

  Args:
    values: str -> Python, numpy or jax scalar (arrays of size 1 included).

  Returns:
    A new dict with bool, int, float or str values.

  Raises:
    ValueError: for a value with more than one element.
  """
  return {str(k): _to_python(k, v) for k, v in values.items()}


class Tracker(abc.ABC):
  """Where the trainer sends its config and metrics."""

  @abc.abstractmethod
  def log_config(self, config):
    """Records the run's config.

    Args:
      config: a (nested) dict of plain values.
    """

  @abc.abstractmethod
  def log(self, step, metrics):
    """Records metrics at one step.

    Args:
      step: the optimizer step the metrics belong to.
      metrics: flat dict, e.g. {"train/loss": 0.3, "eval/accuracy": 0.9};
        values may be numpy or jax scalars.
    """

  @abc.abstractmethod
  def summary(self, values):
    """Records final or best values of the run (e.g. the best eval score).

    Args:
      values: flat dict of scalars; later calls update earlier ones.
    """

  @abc.abstractmethod
  def finish(self):
    """Flushes and closes; the tracker is not used afterwards."""


class NullTracker(Tracker):
  """Records nothing: for processes other than 0, and for tests."""

  def log_config(self, config):
    del config

  def log(self, step, metrics):
    del step, metrics

  def summary(self, values):
    del values

  def finish(self):
    pass


def _write_json_atomically(path, obj):
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)


class JsonlTracker(Tracker):
  """Appends one JSON object per `log` call to a file.

  Each line is `{"step": s, "train/loss": ..., ...}` and is flushed at once,
  so a crashed run keeps everything logged before the crash. NaN and Inf are
  written as Python's json module does (`NaN`, `Infinity`), which
  `json.loads` and pandas read back. The file holds step records only: the
  config and the summary go to `<stem>_config.json` and `<stem>_summary.json`
  beside it (e.g. metrics_config.json for metrics.jsonl).
  """

  def __init__(self, path):
    """Opens `path` for appending (a resumed run continues the file).

    Args:
      path: the .jsonl file; its directory is created if missing.
    """
    self.path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    stem = os.path.splitext(self.path)[0]
    self.config_path = stem + "_config.json"
    self.summary_path = stem + "_summary.json"
    self._file = open(self.path, "a", encoding="utf-8")

  def log_config(self, config):
    _write_json_atomically(self.config_path, config)

  def log(self, step, metrics):
    record = {"step": int(step)}
    values = to_python(metrics)
    if "step" in values:
      raise ValueError("A metric may not be called 'step' (the record key).")
    record.update(values)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def summary(self, values):
    merged = {}
    if os.path.exists(self.summary_path):
      with open(self.summary_path, encoding="utf-8") as f:
        merged = json.load(f)
    merged.update(to_python(values))
    _write_json_atomically(self.summary_path, merged)

  def finish(self):
    if not self._file.closed:
      self._file.close()


def read_jsonl(path):
  """Reads a metrics file written by `JsonlTracker`.

  Args:
    path: the .jsonl file.

  Returns:
    A list of dicts, one per line.
  """
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_after(path, step):
  """Drops the records with a step greater than `step` from a metrics file.

  A run resumed from the checkpoint at `step` logs the later steps again;
  truncating first makes its metrics.jsonl equal to that of a run that never
  stopped. A last line cut short by a crash is dropped too. The file is
  replaced atomically; a missing file is left missing.

  Args:
    path: the .jsonl file.
    step: the step the run resumes from; records with step <= `step` stay.

  Returns:
    The number of lines dropped.

  Raises:
    ValueError: if a line other than the last is not valid JSON.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  kept, dropped = [], 0
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        dropped += 1
        continue
      raise ValueError(f"{path}, line {i + 1}, is not valid JSON: {e}") from e
    if isinstance(record, dict) and record.get("step", -math.inf) > step:
      dropped += 1
      continue
    kept.append(line if line.endswith("\n") else line + "\n")
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  return dropped


def resolve_wandb_mode(mode):
  """The W&B mode to start in.

  Args:
    mode: `config.wandb.mode`: auto | online | offline | disabled. "auto" is
      the WANDB_MODE environment variable when that is set, else "online"
      when WANDB_API_KEY is set, else "offline".

  Returns:
    "online", "offline" or "disabled".

  Raises:
    ValueError: for an unknown mode, naming `config.wandb.mode`.
  """
  if mode not in WANDB_MODES:
    raise ValueError(
        f"Unknown config.wandb.mode {mode!r}; valid choices: "
        f"{', '.join(WANDB_MODES)}.")
  if mode != "auto":
    return mode
  env_mode = os.environ.get("WANDB_MODE", "")
  if env_mode in ("online", "offline", "disabled"):
    return env_mode
  return "online" if os.environ.get("WANDB_API_KEY") else "offline"


_NEXT_MODE = {"online": "offline", "offline": "disabled"}


class WandbTracker(Tracker):
  """Logs to Weights & Biases; falls back instead of raising.

  `mode` tells which mode is in use after the fallbacks; `run` is the W&B run
  (None once disabled).
  """

  def __init__(self, *, project, dir, entity="", group="", name="", tags=(),
               config=None, mode="auto", run_id=None, resume_step=None):
    """Starts the W&B run.

    Args:
      project: W&B project.
      dir: directory W&B writes under (it creates `<dir>/wandb/`).
      entity: W&B entity; "" for the account's default.
      group: run group; "" for none.
      name: run name; "" lets W&B choose.
      tags: run tags.
      config: the run config (a nested dict).
      mode: auto | online | offline | disabled (see `resolve_wandb_mode`).
      run_id: continue this W&B run instead of starting a new one.
      resume_step: with `run_id`, rewind the run to this step
        (`resume_from="<run_id>?_step=<step>"`: W&B drops the history after
        it and keeps the original as an archived run), so steps logged again
        land in the history. Should W&B refuse the rewind (a preview
        feature), the run is continued with resume="allow", which keeps only
        the steps after the last one W&B holds.

    Raises:
      ValueError: for an unknown mode. W&B's own errors never propagate.
    """
    os.makedirs(dir, exist_ok=True)
    self._init_kwargs = dict(
        project=project or None,
        entity=entity or None,
        group=group or None,
        name=name or None,
        tags=list(tags) or None,
        config=dict(config or {}),
        dir=os.fspath(dir),
        # Each tracker owns its run; an earlier run in the process (a test, a
        # notebook) is neither returned nor finished.
        reinit="create_new",
    )
    self._continue(run_id, resume_step)
    self.run = None
    self.mode = "disabled"
    self._last_step = None  # the last step W&B accepted, for a re-init
    self._start(resolve_wandb_mode(mode))

  @property
  def run_id(self):
    """The W&B run id, or None when disabled."""
    return None if self.run is None else self.run.id

  def _continue(self, run_id, step):
    """Makes the next init continue `run_id`, rewound to `step` if given."""
    rewind = run_id and step is not None
    self._init_kwargs.update(
        id=None if rewind else run_id or None,
        resume=None if rewind or not run_id else "allow",
        resume_from=f"{run_id}?_step={int(step)}" if rewind else None)

  def _start(self, mode):
    import wandb  # pylint: disable=import-outside-toplevel
    while mode != "disabled":
      attempts = [self._init_kwargs]
      rewind = self._init_kwargs["resume_from"]
      if rewind:
        run_id = rewind.split("?")[0]
        attempts.append({**self._init_kwargs, "resume_from": None,
                         "id": run_id, "resume": "allow"})
      for kwargs in attempts:
        try:
          self.run = wandb.init(mode=mode, **kwargs)
          self.mode = mode
          return
        except Exception as e:  # pylint: disable=broad-except
          error = e
          if kwargs["resume_from"]:
            warnings.warn(
                f"W&B could not rewind run {rewind} in {mode} mode "
                f"({type(e).__name__}: {e}); continuing run {run_id} with "
                f"resume='allow' instead, where W&B keeps only the steps "
                f"after the last one it holds (metrics.jsonl has them all).",
                RuntimeWarning, stacklevel=3)
      fallback = _NEXT_MODE[mode]
      warnings.warn(
          f"W&B could not start in {mode} mode ({type(error).__name__}: "
          f"{error}); continuing with W&B {fallback}. metrics.jsonl is "
          f"unaffected.", RuntimeWarning, stacklevel=3)
      mode = fallback
    self.run = None
    self.mode = "disabled"

  def _fall_back(self, error, what):
    fallback = _NEXT_MODE.get(self.mode, "disabled")
    warnings.warn(
        f"W&B {what} failed in {self.mode} mode ({type(error).__name__}: "
        f"{error}); continuing with W&B {fallback}.", RuntimeWarning,
        stacklevel=4)
    run_id = self.run.id
    try:
      self.run.finish()
    except Exception:  # pylint: disable=broad-except
      pass  # The run is being abandoned; its errors no longer matter.
    self.run = None
    if self._last_step is not None:
      # The same run from the last step it accepted (nothing is dropped).
      self._continue(run_id, self._last_step)
    self._start(fallback)

  def _call(self, what, fn):
    """Runs fn(run); on an error falls back one mode and retries once."""
    for _ in range(2):
      if self.run is None:
        return
      try:
        fn(self.run)
        return
      except Exception as e:  # pylint: disable=broad-except
        self._fall_back(e, what)

  def log_config(self, config):
    self._init_kwargs["config"].update(config)
    self._call("config update",
               lambda run: run.config.update(config, allow_val_change=True))

  def log(self, step, metrics):
    values = to_python(metrics)

    def log(run):
      run.log(values, step=int(step))
      self._last_step = int(step)

    self._call("log", log)

  def summary(self, values):
    values = to_python(values)
    self._call("summary", lambda run: run.summary.update(values))

  def finish(self):
    if self.run is None:
      return
    try:
      self.run.finish()
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"W&B finish failed ({type(e).__name__}: {e}).",
                    RuntimeWarning, stacklevel=2)
    self.run = None


class MultiTracker(Tracker):
  """Sends every call to several trackers, in order."""

  def __init__(self, trackers):
    """Wraps `trackers`.

    Args:
      trackers: the trackers to forward to.
    """
    self.trackers = list(trackers)

  def log_config(self, config):
    for t in self.trackers:
      t.log_config(config)

  def log(self, step, metrics):
    for t in self.trackers:
      t.log(step, metrics)

  def summary(self, values):
    for t in self.trackers:
      t.summary(values)

  def finish(self):
    # Finish all of them even if one fails, then report the first failure.
    first_error = None
    for t in self.trackers:
      try:
        t.finish()
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or e
    if first_error is not None:
      raise first_error


def _config_dict(config):
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def create_tracker(config, workdir, process_index, *, resume_step=None):
  """The tracker for one process of a run.

  Args:
    config: the full config; reads the `wandb` section.
    workdir: the run's directory; metrics.jsonl, the W&B files and the W&B
      run id (for resuming) go there.
    process_index: `jax.process_index()`; only process 0 records anything.
    resume_step: when resuming from a checkpoint, its step: metrics.jsonl
      records after it are dropped (see `truncate_after`); the W&B run
      recorded in the workdir is rewound to step 0 (see `WandbTracker`) and
      the kept records are logged to it again, so both end up as for a run
      that never stopped. None for a new run: the files are appended to as
      they are.

  Returns:
    On process 0, a `MultiTracker` of `JsonlTracker(<workdir>/metrics.jsonl)`
    and a `WandbTracker` (skipped when `config.wandb.mode` is "disabled");
    on other processes a `NullTracker`.

  Raises:
    ValueError: for an unknown `config.wandb.mode` (on every process, so a
      typo fails everywhere alike).
  """
  mode = resolve_wandb_mode(config.wandb.mode)
  if process_index != 0:
    return NullTracker()
  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if resume_step is not None:
    truncate_after(metrics_path, resume_step)
  trackers = [JsonlTracker(metrics_path)]
  if mode != "disabled":
    id_path = os.path.join(workdir, WANDB_RUN_ID_FILE)
    run_id = None
    if resume_step is not None and os.path.exists(id_path):
      with open(id_path, encoding="utf-8") as f:
        run_id = f.read().strip() or None
    wandb_tracker = WandbTracker(
        project=config.wandb.project, entity=config.wandb.entity,
        group=config.wandb.group, name=config.wandb.name,
        tags=tuple(config.wandb.tags), config=_config_dict(config),
        dir=workdir, mode=mode, run_id=run_id,
        resume_step=None if resume_step is None else 0)
    # The W&B history is rebuilt from metrics.jsonl (up to the checkpoint):
    # a killed attempt may have sent only part of what it logged (online,
    # its last row is held back until a later step comes; offline, the run
    # file keeps nothing after its last buffered write).
    if resume_step is not None and os.path.exists(metrics_path):
      for record in read_jsonl(metrics_path):
        wandb_tracker.log(record.pop("step"), record)
    if wandb_tracker.run_id:
      with open(id_path, "w", encoding="utf-8") as f:
        f.write(wandb_tracker.run_id + "\n")
    trackers.append(wandb_tracker)
  return MultiTracker(trackers)
