"""Checkpoints: the last few for resuming, plus the best one by an eval metric.

A thin layer over one orbax `CheckpointManager`. On disk, under the workdir:

  checkpoints/<step>/state/     the arrays: parameters, optimiser state, keys
  checkpoints/<step>/extras/    small JSON: data position, epoch, label names...
  checkpoints/<step>/metrics/   the eval metrics of an evaluation step

Orbax's preservation policy keeps a step if either the last `keep` saves or
the best one by the metric (`LatestN` or `BestN`) want it, so a best
checkpoint that is also one of the latest is written once, and an old best
one stays when newer saves are pruned. Each step is written to
`<step>.orbax-checkpoint-tmp` and renamed when complete, so a crash mid-save
leaves the previous step as the latest one.

Runs written before this layout kept the best checkpoint in a second
directory, `best/<step>/`; opening such a workdir moves it into
`checkpoints/` once (see `Checkpointer._adopt_legacy_best`).

Typical use in a trainer:

  ckpt = Checkpointer(workdir, keep=c.keep_checkpoints,
                      best_metric=c.eval_metric, best_mode=c.eval_metric_mode)
  ckpt.install_sigterm_handler()
  if ckpt.latest_step() is not None:
    step, state, extras = ckpt.restore(abstract_like(state))
  ...
  ckpt.save(step, state, extras, metrics=eval_metrics)  # ranked for the best
  if ckpt.reached_preemption(step):
    ckpt.save(step, state, extras)
    ckpt.close()
    sys.exit(...)
"""

import json
import logging
import math
import os
import signal
import threading
from typing import Any, Mapping

from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

PyTree = Any

CHECKPOINT_DIR = "checkpoints"
# The second directory of the two-manager layout (before one manager with a
# preservation policy); only read, to move its checkpoint into CHECKPOINT_DIR.
LEGACY_BEST_DIR = "best"
# Orbax writes a step's metrics to `<step>/metrics/metrics`.
_METRICS_ITEM = "metrics"


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved or restored; the message names the path."""


def abstract_like(state: PyTree) -> PyTree:
  """Returns the restore target for a state shaped like `state`.

  Every `jax.Array` leaf becomes a `jax.ShapeDtypeStruct` with the same shape,
  dtype and sharding; other leaves are kept as they are. To restore onto a
  different mesh, build the target from a state laid out on that mesh (for
  example the freshly initialised, sharded state of the new run): orbax reads
  each shard it needs whatever the layout at save time.

  Typed PRNG keys (`jax.random.key`) keep their key dtype here; orbax (0.12)
  stores them as their raw `key_data` plus the key implementation and rewraps
  them on restore, so they need no conversion by us.

  Args:
    state: a pytree of arrays (an `nnx.State`, optax state, PRNG keys...).

  Returns:
    The same pytree with `jax.ShapeDtypeStruct` leaves.
  """

  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

  return jax.tree.map(leaf, state)


def _json_copy(obj: Any, what: str) -> Any:
  """Returns a JSON round-trip copy of `obj`, or a clear error if it has none.

  The copy is checked in the calling thread (an async save serialises later,
  in a background thread, where a bad value would fail far from its cause) and
  cannot be changed by the caller while that save is in flight.
  """
  try:
    return json.loads(json.dumps(obj))
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"Checkpoint {what} must be plain JSON (dict, list, str, int, float, "
        f"bool, None); convert numpy/jax scalars with float() or int(): {e}"
    ) from e


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Converts numeric metric values (jax/numpy scalars too) to Python floats."""
  out = {}
  for name, value in metrics.items():
    try:
      out[name] = float(value)
    except (TypeError, ValueError):
      out[name] = value
  return out


class _NoMetricsWarningFilter(logging.Filter):
  """Drops orbax's warning for a save without metrics.

  With a metric-ranked policy orbax warns on every save that has none, but
  periodic and preemption saves between evaluations are meant to have none
  (the policy keeps them as latest, never as best).
  """

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


_no_metrics_filter = _NoMetricsWarningFilter()


class Checkpointer:
  """Saves and restores training state with one orbax CheckpointManager.

  Keeps the last `keep` checkpoints plus the best one by `best_metric` under
  `<workdir>/checkpoints` (orbax `AnyPreservationPolicy` of `LatestN` and
  `BestN`). Each step is written once, whether it is one of the latest, the
  best or both. Ties of the metric keep the older step, as the trainer's
  best-step bookkeeping does.

  Not thread-safe; call it from the training loop's thread. With several
  processes, every process must make the same calls (orbax synchronises
  them).
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      keep: int = 2,
      best_metric: str = "accuracy",
      best_mode: str = "max",
      async_save: bool = True,
  ):
    """Opens (or creates) `<workdir>/checkpoints`.

    Unfinished temporary step directories left by a crash are removed, and a
    best checkpoint of the old two-directory layout (`<workdir>/best`) is
    moved into `checkpoints/`.

    Args:
      workdir: the run directory (a local path, or any path orbax's `epath`
        understands, such as gs://).
      keep: how many of the most recent checkpoints to keep (>= 1).
      best_metric: the metric that ranks the checkpoints saved with metrics.
      best_mode: "max" if larger `best_metric` is better, "min" if smaller.
      async_save: write in a background thread; `save` returns once the
        arrays are copied off the accelerator.

    Raises:
      ValueError: `keep` < 1 or an unknown `best_mode`.
      CheckpointError: the checkpoint directory cannot be created or read, or
        a legacy `best/` directory cannot be moved (the message says how to
        move it by hand).
    """
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}.")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    self.workdir = epath.Path(workdir)  # like orbax: local or gs://
    self.directory = self.workdir / CHECKPOINT_DIR
    self.keep = keep
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._sigterm = threading.Event()
    self._previous_sigterm_handler = None
    self._sigterm_installed = False
    self._pending_step = None  # step of the last save, for error messages
    logging.getLogger("absl").addFilter(_no_metrics_filter)

    # Checked before orbax opens it: orbax would accept a file here and fail
    # later in a background thread.
    if self.directory.exists() and not self.directory.is_dir():
      raise CheckpointError(
          f"Checkpoint directory {self.directory} exists and is not a "
          f"directory.")
    self._adopt_legacy_best()
    options = ocp.CheckpointManagerOptions(
        # best_fn makes orbax store each step's metrics (so the ranking
        # survives a restart) and gives `best_step`; BestN ranks with it too.
        best_fn=self._rank,
        best_mode=best_mode,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(
                get_metric_fn=self._rank,
                reverse=(best_mode == "min"),
                n=1,
                # Saves without metrics are the LatestN policy's business.
                keep_checkpoints_without_metrics=False,
            ),
        ]),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a crash mid-save
        create=True,
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:
      raise CheckpointError(
          f"Cannot open checkpoint directory {self.directory}: {e}") from e

  # --- Metric ranking ----------------------------------------------------------

  def _score(self, metrics: Mapping[str, Any] | None) -> float:
    """The value of `best_metric` in `metrics`; missing or NaN ranks worst."""
    worst = -math.inf if self.best_mode == "max" else math.inf
    # A missing metric happens when a run resumes with another eval_metric:
    # the old best then loses to the first new save.
    if not metrics or self.best_metric not in metrics:
      return worst
    value = float(metrics[self.best_metric])
    return worst if math.isnan(value) else value

  def _rank(self, metrics: Mapping[str, Any] | None) -> tuple[float, int]:
    """Orbax's sort key: the score, then the older step on a tie.

    Orbax sorts ascending (descending for "min") and keeps the last, and its
    sort is stable, so a plain score would keep the newest of equal ones.
    """
    step = int((metrics or {}).get("step", 0))
    value = self._score(metrics)
    return (value, -step) if self.best_mode == "max" else (value, step)

  # --- The two-directory layout of earlier versions ----------------------------

  def _adopt_legacy_best(self) -> None:
    """Moves `<workdir>/best/<step>` into `checkpoints/`, once.

    Earlier versions wrote the best checkpoint a second time into `best/`
    (without metrics in `checkpoints/`). Its step directory is renamed into
    `checkpoints/`, or, when `checkpoints/` has that step too (same state),
    only its metrics are copied there; then `best/` is removed. Each part is
    safe to repeat, so a crash during the move is finished by the next open.
    Process 0 moves; the others wait for it.

    Raises:
      CheckpointError: the move failed; the message says how to do it by hand.
    """
    legacy = self.workdir / LEGACY_BEST_DIR
    if jax.process_index() == 0 and legacy.is_dir():
      try:
        # Complete steps only (orbax's own reading of a step directory);
        # unfinished ones are dropped with the directory.
        steps = ocp.path.step.standard_name_format().find_all(legacy)
        self.directory.mkdir(parents=True, exist_ok=True)
        for metadata in steps:
          self._adopt_legacy_step(legacy / str(metadata.step), metadata.step)
        legacy.rmtree()
      except Exception as e:
        raise CheckpointError(
            f"{legacy} holds the best checkpoint in the layout of earlier "
            f"versions and could not be moved into {self.directory} "
            f"({type(e).__name__}: {e}). Move it by hand: for each step "
            f"directory {legacy}/<step>, if {self.directory}/<step> exists "
            f"copy {legacy}/<step>/metrics/metrics to "
            f"{self.directory}/<step>/metrics/metrics, otherwise move "
            f"{legacy}/<step> to {self.directory}/<step>; then delete "
            f"{legacy}.") from e
      logging.getLogger(__name__).info(
          "moved the best checkpoint(s) %s from %s into %s",
          [m.step for m in steps], legacy, self.directory)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("research_checkpointer_legacy_best")

  def _adopt_legacy_step(self, source: epath.Path, step: int) -> None:
    target = self.directory / str(step)
    metrics = json.loads(
        (source / _METRICS_ITEM / _METRICS_ITEM).read_text())
    metrics["step"] = step  # the tie-break key of `_rank`
    if not target.exists():
      (source / _METRICS_ITEM / _METRICS_ITEM).write_text(json.dumps(metrics))
      source.rename(target)
      return
    (target / _METRICS_ITEM).mkdir(exist_ok=True)
    tmp = target / _METRICS_ITEM / f"{_METRICS_ITEM}.tmp"
    tmp.write_text(json.dumps(metrics))
    tmp.replace(target / _METRICS_ITEM / _METRICS_ITEM)

  # --- Saving ------------------------------------------------------------------

  def _finish(self) -> None:
    """Waits for the async save; raises its error naming the step directory."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      # Orbax already dropped the old steps it meant to delete from its step
      # list, but the failed save stopped before deleting them: re-read disk.
      self._manager.reload()
      step = "?" if self._pending_step is None else self._pending_step
      raise CheckpointError(
          f"Saving checkpoint step {step} to {self.directory / str(step)} "
          f"failed: {type(e).__name__}: {e}. Earlier checkpoints in "
          f"{self.directory} are unaffected."
      ) from e

  def save(
      self,
      step: int,
      state: PyTree,
      extras: Mapping[str, Any],
      metrics: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves a checkpoint at `step`; keeps the last `keep` and the best.

    With `async_save`, this returns once the arrays are copied to host memory;
    the write continues in the background. A failure of that write is raised
    by the next `save`, `wait_until_finished`, `restore` or `close`.

    Args:
      step: the training step; a step that is already saved is skipped.
      state: a pytree of arrays (`nnx.State`, optax state, PRNG keys...).
      extras: small plain-JSON values restored with the state (tuples come back
        as lists).
      metrics: the evaluation metrics at `step`, if any; they rank this
        checkpoint for `best_step` (stored with it, under `metrics/`, with
        "step" added). A save without metrics is never the best.
      force: save even if orbax's save policy would skip `step` (a step not
        after the latest saved one).

    Returns:
      Whether a new checkpoint was written.

    Raises:
      CheckpointError: this save, or an earlier async one, failed; the message
        names the step directory.
      KeyError: `metrics` lacks `best_metric`.
      TypeError: `extras` or `metrics` are not plain JSON.
    """
    extras = _json_copy(dict(extras), "extras")
    if metrics is not None:
      if self.best_metric not in metrics:
        raise KeyError(
            f"metrics have no {self.best_metric!r}, which selects the best "
            f"checkpoint in {self.directory}; got {sorted(metrics)}.")
      metrics = {**_json_copy(_plain_metrics(metrics), "metrics"), "step": step}
    # Surface a failed earlier async save first, with its own step and path
    # (orbax waits for it inside `save` anyway).
    self._finish()
    # Saving a step twice is routine (an eval-time save, then a preemption
    # save at the same step), and orbax would raise for it under `force`.
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras))
    self._pending_step = step
    try:
      return self._manager.save(step, args=args, metrics=metrics, force=force)
    except Exception as e:
      raise CheckpointError(
          f"Saving checkpoint step {step} to {self.directory / str(step)} "
          f"failed: {type(e).__name__}: {e}. Earlier checkpoints in "
          f"{self.directory} are unaffected."
      ) from e

  def wait_until_finished(self) -> None:
    """Blocks until async saves are on disk; raises their errors.

    Raises:
      CheckpointError: a background save failed; names the step directory.
    """
    self._finish()

  # --- Reading -----------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest complete step, or None if there is none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step of the best checkpoint saved with metrics, or None.

    Raises:
      CheckpointError: no saved metrics have `best_metric` (the run ranked by
        another one); names the metrics that are there.
    """
    step = self._manager.best_step()
    metrics = self.metrics(step) if step is not None else None
    # Missing everywhere would make every step tie and the oldest win.
    if metrics is not None and self.best_metric not in metrics:
      raise CheckpointError(
          f"No checkpoint in {self.directory} has the metric "
          f"{self.best_metric!r} to rank by; the saved metrics are "
          f"{sorted(k for k in metrics if k != 'step')}. Pass the run's "
          f"metric as best_metric.")
    return step

  def all_steps(self) -> list[int]:
    """The complete steps on disk (the latest ones and the best), ascending."""
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The metrics saved with `step` (with "step" added), or None."""
    return self._manager.metrics(step)

  def restore(
      self,
      abstract_state: PyTree | None,
      step: int | None = None,
      best: bool = False,
      partial: bool = False,
  ) -> tuple[int, PyTree, dict[str, Any]]:
    """Restores a checkpoint onto `abstract_state`'s shapes and shardings.

    Args:
      abstract_state: the target: a pytree of `jax.ShapeDtypeStruct` with
        `sharding` set, shaped like the saved state (see `abstract_like`). The
        arrays are placed by these shardings, which may differ from the ones at
        save time (resharded restore). None restores the saved tree as it was
        saved, on the default device (for inspection).
      step: the step to restore; default the latest (or the best).
      best: default to the best step rather than the latest.
      partial: `abstract_state` names a subset of the saved tree (e.g. only
        the parameters, for export); the rest is not read.

    Returns:
      `(step, state, extras)`.

    Raises:
      FileNotFoundError: no such checkpoint; names the directory.
      CheckpointError: reading failed (for example a target that does not
        match the saved tree); names the step directory.
    """
    self._finish()
    if step is None:
      step = self.best_step() if best else self.latest_step()
      if step is None:
        raise FileNotFoundError(
            f"No {'best ' if best else ''}checkpoint in {self.directory}.")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; have "
          f"{self.all_steps()}.")
    if partial:
      state_args = ocp.args.PyTreeRestore(
          abstract_state, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(
              abstract_state))
    else:
      state_args = ocp.args.StandardRestore(abstract_state)
    args = ocp.args.Composite(state=state_args, extras=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:
      # Orbax prints whole metadata trees; the start says what went wrong.
      detail = str(e) if len(str(e)) < 2000 else str(e)[:2000] + " [...]"
      raise CheckpointError(
          f"Restoring checkpoint {self.directory / str(step)} failed: "
          f"{detail}") from e
    return step, restored.state, restored.extras

  # --- Preemption --------------------------------------------------------------

  def install_sigterm_handler(self) -> None:
    """Makes SIGTERM set a flag that `reached_preemption` reports.

    The process keeps running, so the trainer can save at its current step and
    exit non-zero. `close` puts the previous handler back. Call from the main
    thread (Python only allows signal handlers there).
    """

    def on_sigterm(signum, frame):
      del signum, frame
      self._sigterm.set()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    if not self._sigterm_installed:
      self._previous_sigterm_handler = previous
      self._sigterm_installed = True

  def restore_sigterm_handler(self) -> None:
    """Puts back the SIGTERM handler that `install_sigterm_handler` replaced."""
    if self._sigterm_installed:
      signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
      self._sigterm_installed = False
      self._previous_sigterm_handler = None

  @property
  def sigterm_received(self) -> bool:
    """Whether SIGTERM arrived since `install_sigterm_handler`."""
    return self._sigterm.is_set()

  def reached_preemption(self, step: int) -> bool:
    """Whether the trainer should save at `step` and stop.

    True after SIGTERM (see `install_sigterm_handler`) or when orbax reports
    the multi-host preemption sync point (JAX's preemption service, e.g. on
    TPU, where all hosts agree on the step). With several processes, prefer
    the latter: a SIGTERM that only some processes see makes the others wait
    for a save they never start.

    Args:
      step: the current training step.
    """
    return self._sigterm.is_set() or self._manager.reached_preemption(step)

  # --- Lifetime ----------------------------------------------------------------

  def close(self) -> None:
    """Waits for pending saves, releases orbax resources, restores SIGTERM.

    Raises:
      CheckpointError: a pending async save failed (resources are released
        anyway).
    """
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()
      self.restore_sigterm_handler()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
