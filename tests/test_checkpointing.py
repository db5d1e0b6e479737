"""Tests for research.training.checkpointing (orbax glue)."""

import collections
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
# The rename that makes a step final; patched to simulate a failing disk.
from orbax.checkpoint._src.path import atomicity
import pytest

from research.training.checkpointing import Checkpointer
from research.training.checkpointing import CheckpointError
from research.training.checkpointing import abstract_like

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_state(seed=0):
  """A trainer-like state: nnx params, adamw state, a typed key, an array."""
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))
  params = nnx.state(model, nnx.Param)
  opt_state = optax.adamw(1e-3).init(params)
  return {
      "params": params,
      "opt_state": opt_state,
      "rng": jax.random.key(seed + 1),
      "step": jnp.asarray(seed, jnp.int32),
      "ema": jnp.full((4,), seed, jnp.float32),
  }


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def failing_rename(monkeypatch):
  """Makes the final rename of every save fail, as on a read-only disk."""

  async def fail(tmp_dir, **kwargs):
    del kwargs
    raise OSError(30, "Read-only file system", str(tmp_dir.get()))

  def install():
    monkeypatch.setattr(atomicity, "on_commit_callback", fail)

  return install, monkeypatch.undo


def test_round_trip_nnx_optax_key_and_extras(tmp_path):
  state = make_state(seed=3)
  extras = {"epoch": 1, "position": 640, "label_names": ["negative", "positive"]}
  with Checkpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(7, state, extras)
    ckpt.wait_until_finished()
    step, restored, restored_extras = ckpt.restore(abstract_like(state))
  assert step == 7
  assert restored_extras == extras
  assert isinstance(restored["params"], nnx.State)
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert_trees_equal(restored, state)
  # The restored key is usable as a key, not just equal bits.
  np.testing.assert_array_equal(
      jax.random.uniform(restored["rng"], (2,)),
      jax.random.uniform(state["rng"], (2,)),
  )


def test_keeps_last_n_and_the_best_even_when_old(tmp_path):
  state = make_state()
  accuracies = {1: 0.9, 2: 0.5, 3: 0.6, 4: 0.7, 5: 0.4}
  with Checkpointer(tmp_path, keep=2, best_metric="accuracy") as ckpt:
    for step, acc in accuracies.items():
      ckpt.save(step, state, {"step": step}, metrics={"accuracy": acc})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 4, 5]
    assert ckpt.best_step() == 1 and ckpt.latest_step() == 5
    assert ckpt.metrics(1) == {"accuracy": 0.9, "step": 1}
    step, _, extras = ckpt.restore(abstract_like(state), best=True)
  assert (step, extras) == (1, {"step": 1})
  # One directory: the best is not kept a second time anywhere.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
  on_disk = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert on_disk == ["1", "4", "5"]
  # A reader must rank by the run's metric; another one would tie everywhere.
  with Checkpointer(tmp_path, best_metric="f1") as ckpt:
    with pytest.raises(CheckpointError, match=r"'f1'.*\['accuracy'\]"):
      ckpt.best_step()


@pytest.fixture
def state_writes(monkeypatch):
  """Counts the state trees written, per step directory."""
  writes = collections.Counter()
  real = ocp.StandardCheckpointHandler.async_save

  async def counting(self, directory, *args, **kwargs):
    writes[pathlib.Path(str(directory)).parent.name.split(".")[0]] += 1
    return await real(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", counting)
  return writes


def test_each_step_is_written_once_best_included(tmp_path, state_writes):
  # Every evaluation improves, so every save is both the latest and the best
  # (the two-manager layout wrote each of them twice: 10 writes for 5).
  state = make_state()
  with Checkpointer(tmp_path, keep=2) as ckpt:
    for step, acc in enumerate([0.5, 0.6, 0.7, 0.8, 0.9], start=1):
      assert ckpt.save(step, state, {}, metrics={"accuracy": acc})
    assert ckpt.save(6, state, {})  # a periodic save without evaluation
    assert not ckpt.save(6, state, {}, force=True)  # preemption, same step
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 5 and ckpt.all_steps() == [5, 6]
  assert state_writes == {str(s): 1 for s in range(1, 7)}


def test_ties_keep_the_older_best(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path, keep=1) as ckpt:
    for step, acc in [(1, 0.5), (2, 0.75), (3, 0.75), (4, 0.25)]:
      ckpt.save(step, state, {}, metrics={"accuracy": acc})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 2 and ckpt.all_steps() == [2, 4]


def test_best_min_mode_and_the_ranking_survives_a_restart(tmp_path):
  state = make_state()
  opts = dict(keep=1, best_metric="loss", best_mode="min")
  with Checkpointer(tmp_path, **opts) as ckpt:
    for step, loss in [(1, 0.8), (2, 0.3), (3, 0.3), (4, float("nan"))]:
      ckpt.save(step, state, {}, metrics={"loss": loss})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 2 and ckpt.all_steps() == [2, 4]
  # Orbax stored the metrics with each step.
  with Checkpointer(tmp_path, **opts) as ckpt:
    assert ckpt.best_step() == 2
    ckpt.save(5, state, {}, metrics={"loss": 0.4})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 2 and ckpt.all_steps() == [2, 5]
    ckpt.save(6, state, {}, metrics={"loss": 0.1})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 6 and ckpt.all_steps() == [6]


def test_latest_step_after_several_saves_and_reopen(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path, keep=3) as ckpt:
    assert ckpt.latest_step() is None
    for step in (10, 20, 30):
      ckpt.save(step, state, {"at": step})
    assert ckpt.latest_step() == 30
    # A second save at the same step (e.g. on preemption) is a no-op.
    assert not ckpt.save(30, state, {"at": -1}, force=True)
  with Checkpointer(tmp_path, keep=3) as ckpt:
    assert ckpt.latest_step() == 30
    step, _, extras = ckpt.restore(abstract_like(state), step=20)
    assert (step, extras) == (20, {"at": 20})
    _, _, extras = ckpt.restore(abstract_like(state))
    assert extras == {"at": 30}
    with pytest.raises(FileNotFoundError, match="step 99"):
      ckpt.restore(abstract_like(state), step=99)


def test_unfinished_tmp_dir_is_ignored(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {"at": 1})
    ckpt.save(2, state, {"at": 2})
  # What a crash mid-save leaves: orbax 0.12 writes `<step>.orbax-checkpoint-tmp`
  # (older versions appended `-<timestamp>`); both must be ignored.
  for name in ("3.orbax-checkpoint-tmp", "4.orbax-checkpoint-tmp-1700000000"):
    partial = tmp_path / "checkpoints" / name / "state"
    partial.mkdir(parents=True)
    (partial / "half_written").write_bytes(b"\0" * 16)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 2
    step, _, extras = ckpt.restore(abstract_like(state))
    assert (step, extras) == (2, {"at": 2})
    # Saving the step that was interrupted works.
    assert ckpt.save(3, state, {"at": 3})
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 3


def test_async_save_returns_then_wait_finalises(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(1, state, {})
    ckpt.wait_until_finished()
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert names == ["1"]
    assert (tmp_path / "checkpoints" / "1" / "state").is_dir()
    assert (tmp_path / "checkpoints" / "1" / "extras").is_dir()


@pytest.mark.parametrize("async_save", [True, False])
def test_save_failure_surfaces_and_keeps_last_good(
    tmp_path, failing_rename, async_save
):
  install, uninstall = failing_rename
  state = make_state()
  ckpt = Checkpointer(tmp_path, async_save=async_save)
  ckpt.save(1, state, {"at": 1})
  ckpt.wait_until_finished()
  install()
  step2_dir = str(tmp_path / "checkpoints" / "2")
  if async_save:
    ckpt.save(2, state, {"at": 2})  # the failure happens in the background
    with pytest.raises(CheckpointError, match="Read-only") as err:
      ckpt.wait_until_finished()
  else:
    with pytest.raises(CheckpointError, match="Read-only") as err:
      ckpt.save(2, state, {"at": 2})
  assert step2_dir in str(err.value)
  uninstall()
  assert ckpt.latest_step() == 1
  step, _, extras = ckpt.restore(abstract_like(state))
  assert (step, extras) == (1, {"at": 1})
  ckpt.save(2, state, {"at": 2})
  ckpt.close()
  with Checkpointer(tmp_path) as reopened:
    assert reopened.all_steps() == [1, 2]


def test_async_failure_is_raised_by_the_next_save(tmp_path, failing_rename):
  install, uninstall = failing_rename
  state = make_state()
  with Checkpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(1, state, {})
    ckpt.wait_until_finished()
    install()
    ckpt.save(2, state, {})
    with pytest.raises(CheckpointError, match="step 2") as err:
      ckpt.save(3, state, {})
    uninstall()
    assert str(tmp_path / "checkpoints" / "2") in str(err.value)
    assert ckpt.save(3, state, {})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 3]


def test_errors_name_the_path(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(CheckpointError, match=str(tmp_path / "checkpoints")):
    Checkpointer(tmp_path)
  empty = tmp_path / "empty"
  with Checkpointer(empty) as ckpt:
    with pytest.raises(FileNotFoundError, match=str(empty / "checkpoints")):
      ckpt.restore(abstract_like(make_state()))
    with pytest.raises(KeyError, match="accuracy"):
      ckpt.save(1, make_state(), {}, metrics={"f1": 0.5})
    with pytest.raises(TypeError, match="plain JSON"):
      ckpt.save(1, make_state(), {"epoch": np.int64(1)})
    assert ckpt.latest_step() is None


def _write_two_manager_layout(workdir, accuracies, keep=2):
  """A workdir as the two-manager Checkpointer wrote it (before one manager).

  `checkpoints/` kept the last `keep` steps without metrics; `best/` the best
  step again, with its metrics. The options are those of that version.
  """
  common = dict(enable_async_checkpointing=False, create=True)
  latest = ocp.CheckpointManager(
      workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
          **common))
  score = lambda m: m["accuracy"]
  best = ocp.CheckpointManager(
      workdir / "best", options=ocp.CheckpointManagerOptions(
          best_fn=score, best_mode="max",
          preservation_policy=ocp.checkpoint_managers.BestN(
              get_metric_fn=score, n=1,
              keep_checkpoints_without_metrics=False), **common))
  best_value = None
  for step, acc in accuracies.items():
    args = ocp.args.Composite(state=ocp.args.StandardSave(make_state(step)),
                              extras=ocp.args.JsonSave({"at": step}))
    latest.save(step, args=args)
    if best_value is None or acc > best_value:
      best.save(step, args=args, metrics={"accuracy": acc}, force=True)
      best_value = acc
  latest.close()
  best.close()


@pytest.mark.parametrize("accuracies, steps, best", [
    ({1: 0.9, 2: 0.5, 3: 0.6}, [1, 2, 3], 1),   # best older than the latest
    ({1: 0.5, 2: 0.6, 3: 0.9}, [2, 3], 3),      # best is the latest
])
def test_two_manager_layout_is_moved_and_restores(tmp_path, accuracies, steps,
                                                   best):
  _write_two_manager_layout(tmp_path, accuracies)
  assert (tmp_path / "best" / str(best)).is_dir()
  (tmp_path / "best" / "4.orbax-checkpoint-tmp").mkdir()  # a crash mid-save
  with Checkpointer(tmp_path, keep=2) as ckpt:
    assert not (tmp_path / "best").exists()
    assert ckpt.all_steps() == steps
    assert ckpt.best_step() == best and ckpt.latest_step() == 3
    assert ckpt.metrics(best) == {"accuracy": accuracies[best], "step": best}
    step, restored, extras = ckpt.restore(abstract_like(make_state()),
                                          best=True)
    assert (step, extras) == (best, {"at": best})
    assert_trees_equal(restored, make_state(best))
    step, restored, _ = ckpt.restore(abstract_like(make_state()))
    assert step == 3
    assert_trees_equal(restored, make_state(3))
    # Training continues in the one directory and the moved best competes.
    ckpt.save(4, make_state(4), {"at": 4}, metrics={"accuracy": 0.7})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == best and ckpt.all_steps() == sorted({best, 3, 4})
    ckpt.save(5, make_state(5), {"at": 5}, metrics={"accuracy": 0.95})
    ckpt.wait_until_finished()
    assert ckpt.best_step() == 5 and ckpt.all_steps() == [4, 5]


def test_two_manager_layout_that_cannot_be_moved_says_how(tmp_path):
  _write_two_manager_layout(tmp_path, {1: 0.9, 2: 0.5, 3: 0.6})
  (tmp_path / "best" / "1" / "metrics" / "metrics").unlink()
  with pytest.raises(CheckpointError, match="Move it by hand") as err:
    Checkpointer(tmp_path)
  assert f"move {tmp_path / 'best'}/<step> to" in str(err.value)
  assert (tmp_path / "best" / "1" / "state").is_dir()  # nothing was lost


def test_sigterm_sets_preemption_flag(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  ckpt = Checkpointer(tmp_path)
  try:
    ckpt.install_sigterm_handler()
    assert not ckpt.reached_preemption(5)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not ckpt.sigterm_received and time.monotonic() < deadline:
      time.sleep(0.01)
    assert ckpt.reached_preemption(5)
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, previous)


RESHARD_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from research.training.checkpointing import Checkpointer, abstract_like
    assert jax.device_count() == 2, jax.devices()
    state = {"w": jnp.arange(8.0).reshape(4, 2), "rng": jax.random.key(0)}
    state = jax.device_put(state, jax.devices()[0])
    mesh = jax.make_mesh((2,), ("data",))
    target = {
        "w": jax.device_put(jnp.zeros((4, 2)), NamedSharding(mesh, P("data"))),
        "rng": jax.device_put(jax.random.key(9), NamedSharding(mesh, P())),
    }
    with Checkpointer(sys.argv[1]) as ckpt:
      ckpt.save(1, state, {})
      _, restored, _ = ckpt.restore(abstract_like(target))
    assert restored["w"].sharding == target["w"].sharding, restored["w"].sharding
    assert restored["rng"].sharding == target["rng"].sharding
    np.testing.assert_array_equal(restored["w"], state["w"])
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
    print("ok")
""")


def test_restore_onto_a_different_mesh(tmp_path):
  # Needs two devices, which must be set before jax starts: a fresh process.
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]
  )
  result = subprocess.run(
      [sys.executable, "-c", RESHARD_SCRIPT, str(tmp_path)],
      capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
