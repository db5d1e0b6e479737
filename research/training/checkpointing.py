"""Checkpoints: the last few for resuming, plus the best one by an eval metric.

A thin layer over orbax `CheckpointManager`. On disk, under the workdir:

  checkpoints/<step>/state/    the last `keep` saves (resume from here)
  checkpoints/<step>/extras/   small JSON: data position, epoch, label names...
  best/<step>/{state,extras,metrics}/   the single best save by the metric

Each step is written to `<step>.orbax-checkpoint-tmp` and renamed when
complete, so a crash mid-save leaves the previous step as the latest one.

Typical use in a trainer:

  ckpt = Checkpointer(workdir, keep=c.keep_checkpoints,
                      best_metric=c.eval_metric, best_mode=c.eval_metric_mode)
  ckpt.install_sigterm_handler()
  if ckpt.latest_step() is not None:
    step, state, extras = ckpt.restore(abstract_like(state))
  ...
  ckpt.save(step, state, extras, metrics=eval_metrics)  # also offers to best
  if ckpt.reached_preemption(step):
    ckpt.save(step, state, extras)
    ckpt.close()
    sys.exit(...)
"""

import json
import math
import os
import signal
import threading
from typing import Any, Mapping

from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

PyTree = Any


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


class Checkpointer:
  """Saves and restores training state with orbax.

  Keeps the last `keep` checkpoints under `<workdir>/checkpoints` and the best
  one by `best_metric` under `<workdir>/best`. Orbax applies one preservation
  policy per manager (latest-N or best-N, ranked over all its steps), so
  "the last N plus the best, however old" takes two managers in two
  directories; the best one is rewritten only when the metric improves.

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
    """Opens (or creates) the checkpoint directories under `workdir`.

    Unfinished temporary step directories left by a crash are removed.

    Args:
      workdir: the run directory (a local path, or any path orbax's `epath`
        understands, such as gs://).
      keep: how many of the most recent checkpoints to keep (>= 1).
      best_metric: the metric that ranks checkpoints for `save_best`.
      best_mode: "max" if larger `best_metric` is better, "min" if smaller.
      async_save: write in a background thread; `save` returns once the
        arrays are copied off the accelerator.

    Raises:
      ValueError: `keep` < 1 or an unknown `best_mode`.
      CheckpointError: a checkpoint directory cannot be created or read.
    """
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}.")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    self.workdir = epath.Path(workdir)  # like orbax: local or gs://
    self.keep = keep
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._sigterm = threading.Event()
    self._previous_sigterm_handler = None
    self._sigterm_installed = False
    self._pending_step = {}  # manager directory -> step of its last save

    common = dict(
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a crash mid-save
        create=True,
    )
    latest_options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(n=keep), **common
    )
    best_options = ocp.CheckpointManagerOptions(
        # best_fn also makes orbax store each step's metrics, so the ranking
        # survives a restart.
        best_fn=self._score,
        best_mode=best_mode,
        preservation_policy=checkpoint_managers.BestN(
            get_metric_fn=self._score,
            reverse=(best_mode == "min"),
            n=1,
            keep_checkpoints_without_metrics=False,
        ),
        **common,
    )
    self._latest = self._open(self.workdir / "checkpoints", latest_options)
    self._best = self._open(self.workdir / "best", best_options)
    self._best_value = self._stored_best_value()

  @staticmethod
  def _open(directory, options):
    # Orbax would accept a file here and fail later in a background thread.
    if directory.exists() and not directory.is_dir():
      raise CheckpointError(
          f"Checkpoint directory {directory} exists and is not a directory."
      )
    try:
      return ocp.CheckpointManager(directory, options=options)
    except Exception as e:
      raise CheckpointError(
          f"Cannot open checkpoint directory {directory}: {e}"
      ) from e

  # --- Metric ranking ----------------------------------------------------------

  def _score(self, metrics: Mapping[str, Any] | None) -> float:
    """The ranking value of `metrics`; missing or NaN ranks worst."""
    worst = -math.inf if self.best_mode == "max" else math.inf
    # A missing metric happens when a run resumes with another eval_metric:
    # the old best then loses to the first new save.
    if not metrics or self.best_metric not in metrics:
      return worst
    value = float(metrics[self.best_metric])
    return worst if math.isnan(value) else value

  def _better(self, value: float, than: float | None) -> bool:
    if than is None:
      return True
    return value > than if self.best_mode == "max" else value < than

  def _stored_best_value(self) -> float | None:
    step = self._best.best_step()
    if step is None:
      return None
    return self._score(self._best.metrics(step))

  # --- Saving ------------------------------------------------------------------

  def _finish(self, manager) -> None:
    """Waits for `manager`'s async save; raises its error naming the path."""
    try:
      manager.wait_until_finished()
    except Exception as e:
      # Orbax already dropped the old steps it meant to delete from its step
      # list, but the failed save stopped before deleting them: re-read disk.
      manager.reload()
      step = self._pending_step.get(str(manager.directory), "?")
      raise CheckpointError(
          f"Saving checkpoint step {step} to {manager.directory / str(step)} "
          f"failed: {type(e).__name__}: {e}. Earlier checkpoints in "
          f"{manager.directory} are unaffected."
      ) from e

  def _save(self, manager, step, state, extras, metrics, force) -> bool:
    extras = _json_copy(dict(extras), "extras")
    # Surface a failed earlier async save first, with its own step and path
    # (orbax waits for it inside `save` anyway).
    self._finish(manager)
    # Saving a step twice is routine (an eval-time save, then a preemption
    # save at the same step), and orbax would raise for it under `force`.
    if step in manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras)
    )
    target = manager.directory / str(step)
    self._pending_step[str(manager.directory)] = step
    try:
      return manager.save(step, args=args, metrics=metrics, force=force)
    except Exception as e:
      raise CheckpointError(
          f"Saving checkpoint step {step} to {target} failed: "
          f"{type(e).__name__}: {e}. Earlier checkpoints in "
          f"{manager.directory} are unaffected."
      ) from e

  def save(
      self,
      step: int,
      state: PyTree,
      extras: Mapping[str, Any],
      metrics: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves a resumable checkpoint at `step`, keeping the last `keep`.

    With `async_save`, this returns once the arrays are copied to host memory;
    the write continues in the background. A failure of that write is raised
    by the next `save`, `wait_until_finished`, `restore` or `close`.

    Args:
      step: the training step; a step that is already saved is skipped.
      state: a pytree of arrays (`nnx.State`, optax state, PRNG keys...).
      extras: small plain-JSON values restored with the state (tuples come back
        as lists).
      metrics: the evaluation metrics at `step`, if any. When given, the
        checkpoint is also offered to the best directory (see `save_best`).
      force: save even if orbax's save policy would skip `step` (a step not
        after the latest saved one).

    Returns:
      Whether a new checkpoint was written to the latest directory.

    Raises:
      CheckpointError: this save, or an earlier async one, failed; the message
        names the step directory.
      TypeError: `extras` or `metrics` are not plain JSON.
    """
    saved = self._save(self._latest, step, state, extras, None, force)
    if metrics is not None:
      self.save_best(step, state, extras, metrics)
    return saved

  def save_best(
      self,
      step: int,
      state: PyTree,
      extras: Mapping[str, Any],
      metrics: Mapping[str, Any],
  ) -> bool:
    """Saves to the best directory if `metrics` beat the best saved so far.

    Only one checkpoint is kept there: the best by `best_metric` and
    `best_mode` (ties keep the older one). Non-improving calls write nothing.

    Args:
      step: the training step.
      state: a pytree of arrays.
      extras: small plain-JSON values restored with the state.
      metrics: evaluation metrics; must contain `best_metric`.

    Returns:
      Whether a new best checkpoint was written.

    Raises:
      KeyError: `metrics` lacks `best_metric`.
      CheckpointError: the save, or an earlier async one, failed.
    """
    if self.best_metric not in metrics:
      raise KeyError(
          f"metrics have no {self.best_metric!r}, which selects the best "
          f"checkpoint in {self._best.directory}; got {sorted(metrics)}."
      )
    metrics = _json_copy(_plain_metrics(metrics), "metrics")
    value = self._score(metrics)
    if not self._better(value, self._best_value):
      return False
    if step in self._best.all_steps():
      # Written by an earlier run that was resumed from an older checkpoint;
      # this evaluation is better, so it replaces that one.
      self._finish(self._best)
      self._best.delete(step)
    # force: orbax would otherwise skip steps before its latest, which happens
    # after resuming from an older checkpoint.
    try:
      saved = self._save(self._best, step, state, extras, metrics, force=True)
    except CheckpointError:
      self._best_value = self._stored_best_value()
      raise
    if saved:
      self._best_value = value
    return saved

  def wait_until_finished(self) -> None:
    """Blocks until async saves are on disk; raises their errors.

    Raises:
      CheckpointError: a background save failed; names the step directory.
    """
    try:
      self._finish(self._latest)
    finally:
      try:
        self._finish(self._best)
      except CheckpointError:
        self._best_value = self._stored_best_value()
        raise

  # --- Reading -----------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest complete resumable step, or None if there is none."""
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    """The step of the best checkpoint, or None if there is none."""
    return self._best.best_step()

  def all_steps(self, best: bool = False) -> list[int]:
    """The complete steps in the latest (or best) directory, ascending."""
    manager = self._best if best else self._latest
    return sorted(manager.all_steps())

  def restore(
      self,
      abstract_state: PyTree,
      step: int | None = None,
      best: bool = False,
      partial: bool = False,
  ) -> tuple[int, PyTree, dict[str, Any]]:
    """Restores a checkpoint onto `abstract_state`'s shapes and shardings.

    Args:
      abstract_state: the target: a pytree of `jax.ShapeDtypeStruct` with
        `sharding` set, shaped like the saved state (see `abstract_like`). The
        arrays are placed by these shardings, which may differ from the ones at
        save time (resharded restore).
      step: the step to restore; default the latest (or the best).
      best: restore from the best directory instead of the latest ones.
      partial: `abstract_state` names a subset of the saved tree (e.g. only
        the parameters, for export); the rest is not read.

    Returns:
      `(step, state, extras)`.

    Raises:
      FileNotFoundError: no such checkpoint; names the directory.
      CheckpointError: reading failed (for example a target that does not
        match the saved tree); names the step directory.
    """
    manager = self._best if best else self._latest
    self._finish(manager)
    if step is None:
      step = manager.best_step() if best else manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
    elif step not in manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {manager.directory}; have "
          f"{sorted(manager.all_steps())}."
      )
    args = ocp.args.Composite(
        state=(ocp.args.PyTreeRestore(
            abstract_state, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_state)) if partial
               else ocp.args.StandardRestore(abstract_state)),
        extras=ocp.args.JsonRestore(),
    )
    try:
      restored = manager.restore(step, args=args)
    except Exception as e:
      # Orbax prints whole metadata trees; the start says what went wrong.
      detail = str(e) if len(str(e)) < 2000 else str(e)[:2000] + " [...]"
      raise CheckpointError(
          f"Restoring checkpoint {manager.directory / str(step)} failed: "
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
    return self._sigterm.is_set() or self._latest.reached_preemption(step)

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
      self._latest.close()
      self._best.close()
      self.restore_sigterm_handler()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
