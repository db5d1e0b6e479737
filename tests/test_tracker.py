"""Tests for research.training.tracker."""

import glob
import json
import os
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import wandb

from research.configs import default
from research.training import tracker


def _config(mode="disabled"):
  config = default.get_config()
  config.wandb.mode = mode
  return config


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
  """Offline-only W&B, everything under tmp_path, nothing printed."""
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env"))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)


class _FakeRun:

  def __init__(self, run_id, fail_log=False):
    self.id = run_id
    self.fail_log = fail_log
    self.logged = []
    self.finished = False

  def log(self, values, step):
    if self.fail_log:
      raise ConnectionError("network is unreachable")
    self.logged.append((step, values))

  def finish(self):
    self.finished = True


def test_jsonl_records_and_conversion(tmp_path):
  path = tmp_path / "sub" / "metrics.jsonl"
  t = tracker.JsonlTracker(path)
  t.log(1, {"train/loss": np.float32(0.5), "train/lr": jnp.float32(2e-5),
            "train/tokens": np.int64(1024), "train/grad_norm": jnp.bfloat16(1.5),
            "eval/ok": np.bool_(True), "train/x": jnp.array([3.25])})
  # Flushed per line: readable before finish.
  assert tracker.read_jsonl(path) == [{
      "step": 1, "train/loss": 0.5, "train/lr": pytest.approx(2e-5),
      "train/tokens": 1024, "train/grad_norm": 1.5, "eval/ok": True,
      "train/x": 3.25}]
  t.log(np.int32(2), {"train/loss": float("nan")})
  t.summary({"best/accuracy": np.float64(0.75)})
  t.summary({"best/step": 2})
  t.log_config({"optimizer": {"name": "adamw"}, "seed": 0})
  t.finish()
  t.finish()  # idempotent
  lines = path.read_text().splitlines()
  assert len(lines) == 2
  record = json.loads(lines[1])
  assert record["step"] == 2 and np.isnan(record["train/loss"])
  assert json.loads((tmp_path / "sub" / "metrics_summary.json").read_text()) \
      == {"best/accuracy": 0.75, "best/step": 2}
  assert json.loads((tmp_path / "sub" / "metrics_config.json").read_text()) \
      == {"optimizer": {"name": "adamw"}, "seed": 0}


def test_jsonl_rejects_bad_values(tmp_path):
  t = tracker.JsonlTracker(tmp_path / "m.jsonl")
  with pytest.raises(ValueError, match="'train/logits' must be a scalar"):
    t.log(1, {"train/logits": np.zeros(3)})
  with pytest.raises(ValueError, match="'step'"):
    t.log(1, {"step": 3})
  t.finish()
  assert (tmp_path / "m.jsonl").read_text() == ""


def test_wandb_offline_run(tmp_path, wandb_env):
  del wandb_env
  workdir = tmp_path / "run"
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # no fallback happened
    t = tracker.create_tracker(_config("auto"), str(workdir), 0)
    wb = t.trackers[1]
    assert wb.mode == "offline"
    t.log_config({"extra": 1})
    t.log(3, {"train/loss": np.float32(0.25)})
    t.summary({"best/accuracy": 0.5})
    t.finish()
  runs = glob.glob(str(workdir / "wandb" / "offline-run-*"))
  assert len(runs) == 1
  (log,) = glob.glob(os.path.join(runs[0], "run-*.wandb"))
  # run.finish() returns once wandb-core has handled the exit record; the
  # core closes (and flushes) the transaction log a moment later, which on
  # a loaded CI host was after this read (the file held only its 7-byte
  # header). So wait for the flush, as `wandb sync` after exit would.
  deadline = time.monotonic() + 60
  while b"train/loss" not in open(log, "rb").read():
    assert time.monotonic() < deadline, open(log, "rb").read()[:64]
    time.sleep(0.1)
  assert (workdir / tracker.WANDB_RUN_ID_FILE).read_text().strip() in runs[0]
  assert tracker.read_jsonl(workdir / "metrics.jsonl") == [
      {"step": 3, "train/loss": 0.25}]


def test_wandb_init_failure_falls_back(tmp_path, wandb_env, monkeypatch):
  del wandb_env
  modes = []

  def broken_init(**kwargs):
    modes.append(kwargs["mode"])
    raise wandb.errors.CommError("bad API key")

  monkeypatch.setattr(wandb, "init", broken_init)
  monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
  monkeypatch.delenv("WANDB_MODE")
  with pytest.warns(RuntimeWarning) as record:
    t = tracker.create_tracker(_config("auto"), str(tmp_path), 0)
  assert [str(w.message).split(" (")[0] for w in record] == [
      "W&B could not start in online mode",
      "W&B could not start in offline mode"]
  assert modes == ["online", "offline"]
  assert t.trackers[1].mode == "disabled"
  t.log(1, {"train/loss": 1.5})
  t.finish()
  assert tracker.read_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 1, "train/loss": 1.5}]
  assert not (tmp_path / tracker.WANDB_RUN_ID_FILE).exists()


def test_wandb_log_failure_falls_back_to_offline(tmp_path, monkeypatch):
  runs = []

  def fake_init(**kwargs):
    runs.append(_FakeRun(f"id{len(runs)}", fail_log=kwargs["mode"] == "online"))
    return runs[-1]

  monkeypatch.setattr(wandb, "init", fake_init)
  t = tracker.WandbTracker(project="p", dir=str(tmp_path), mode="online")
  with pytest.warns(RuntimeWarning, match="log failed in online mode"):
    t.log(7, {"train/loss": np.float32(2.0)})
  assert t.mode == "offline" and runs[0].finished
  t.log(8, {"train/loss": 1.0})
  assert runs[1].logged == [(7, {"train/loss": 2.0}), (8, {"train/loss": 1.0})]
  t.finish()
  assert runs[1].finished and t.run is None


def test_resume_continues_wandb_run(tmp_path, monkeypatch):
  calls = []

  def fake_init(**kwargs):
    calls.append(kwargs)
    return _FakeRun(kwargs["id"] or "first")

  monkeypatch.setattr(wandb, "init", fake_init)
  config = _config("offline")
  config.wandb.tags = ("glue", "sst2")
  config.wandb.group = "g"
  first = tracker.create_tracker(config, str(tmp_path), 0)
  for step in (2, 4, 6):
    first.log(step, {"train/loss": 1.0 / step})
  first.finish()
  resumed = tracker.create_tracker(config, str(tmp_path), 0, resume_step=5)
  assert calls[0]["id"] is None and calls[0]["resume"] is None
  assert calls[0]["resume_from"] is None
  # Rewound to step 0 and rebuilt from metrics.jsonl up to the checkpoint
  # (step 5): a killed process may not have sent all it logged.
  assert calls[1]["resume_from"] == "first?_step=0"
  assert calls[1]["id"] is None and calls[1]["resume"] is None
  assert resumed.trackers[1].run.logged == [(2, {"train/loss": 0.5}),
                                            (4, {"train/loss": 0.25})]
  resumed.finish()
  assert [r["step"] for r in tracker.read_jsonl(tmp_path / "metrics.jsonl")] \
      == [2, 4]
  assert calls[0]["tags"] == ["glue", "sst2"] and calls[0]["group"] == "g"
  assert calls[0]["entity"] is None and calls[0]["dir"] == str(tmp_path)
  assert calls[0]["config"]["optimizer"]["name"] == "adamw"


def test_refused_rewind_continues_the_run_then_falls_back(tmp_path,
                                                          monkeypatch):
  calls = []

  def init_without_rewind(**kwargs):
    calls.append(kwargs)
    if kwargs["resume_from"] or kwargs["mode"] == "online":
      raise wandb.errors.CommError("rewind is not enabled for this entity")
    return _FakeRun(kwargs["id"])

  monkeypatch.setattr(wandb, "init", init_without_rewind)
  with pytest.warns(RuntimeWarning) as record:
    t = tracker.WandbTracker(project="p", dir=str(tmp_path), mode="online",
                             run_id="abc", resume_step=40)
  assert [(c["mode"], c["resume_from"], c["id"], c["resume"]) for c in calls] \
      == [("online", "abc?_step=40", None, None), ("online", None, "abc", "allow"),
          ("offline", "abc?_step=40", None, None),
          ("offline", None, "abc", "allow")]
  assert [str(w.message).split(" (")[0] for w in record] == [
      "W&B could not rewind run abc?_step=40 in online mode",
      "W&B could not start in online mode",
      "W&B could not rewind run abc?_step=40 in offline mode"]
  assert t.mode == "offline" and t.run_id == "abc"
  t.finish()


def test_log_failure_reinit_continues_the_same_run(tmp_path, monkeypatch):
  runs, calls = [], []

  def fake_init(**kwargs):
    calls.append(kwargs)
    runs.append(_FakeRun("r1"))
    return runs[-1]

  monkeypatch.setattr(wandb, "init", fake_init)
  t = tracker.WandbTracker(project="p", dir=str(tmp_path), mode="online")
  t.log(1, {"train/loss": 1.0})
  runs[0].fail_log = True
  with pytest.warns(RuntimeWarning, match="log failed in online mode"):
    t.log(2, {"train/loss": 0.5})
  # Offline, the same run from the last step W&B accepted: nothing dropped.
  assert calls[1]["mode"] == "offline"
  assert calls[1]["resume_from"] == "r1?_step=1"
  assert runs[0].logged == [(1, {"train/loss": 1.0})]
  assert runs[1].logged == [(2, {"train/loss": 0.5})]
  t.finish()


def test_other_processes_log_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(wandb, "init", lambda **kw: pytest.fail("wandb.init"))
  workdir = tmp_path / "run"
  t = tracker.create_tracker(_config("online"), str(workdir), 1)
  assert isinstance(t, tracker.NullTracker)
  t.log_config({"a": 1})
  t.log(1, {"train/loss": 1.0})
  t.summary({"best": 1.0})
  t.finish()
  assert not workdir.exists()


def test_resolve_wandb_mode(monkeypatch):
  monkeypatch.delenv("WANDB_MODE", raising=False)
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  assert tracker.resolve_wandb_mode("auto") == "offline"
  monkeypatch.setenv("WANDB_API_KEY", "k")
  assert tracker.resolve_wandb_mode("auto") == "online"
  assert tracker.resolve_wandb_mode("offline") == "offline"
  monkeypatch.setenv("WANDB_MODE", "disabled")
  assert tracker.resolve_wandb_mode("auto") == "disabled"
  with pytest.raises(ValueError, match=r"config\.wandb\.mode 'of'.*auto, "
                     r"online, offline, disabled"):
    tracker.create_tracker(_config("of"), "/nonexistent", 1)


def test_truncate_after(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(1, 9)]
  path.write_text("\n".join(lines) + '\n{"step": 9, "train/lo')  # crash
  assert tracker.truncate_after(path, 5) == 4
  assert [r["step"] for r in tracker.read_jsonl(path)] == [1, 2, 3, 4, 5]
  assert tracker.truncate_after(path, 5) == 0
  assert tracker.truncate_after(tmp_path / "missing.jsonl", 3) == 0
  assert not (tmp_path / "missing.jsonl").exists()
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    tracker.truncate_after(path, 1)


def test_resumed_run_matches_straight_run(tmp_path):
  def log_steps(t, steps):
    for s in steps:
      t.log(s, {"train/loss": np.float32(1.0 / s), "train/step_x2": 2 * s})

  straight = tracker.create_tracker(_config(), str(tmp_path / "a"), 0)
  log_steps(straight, range(1, 11))
  straight.finish()

  crashed = tracker.create_tracker(_config(), str(tmp_path / "b"), 0)
  log_steps(crashed, range(1, 8))  # last checkpoint was at step 5
  crashed.finish()
  resumed = tracker.create_tracker(_config(), str(tmp_path / "b"), 0,
                                   resume_step=5)
  log_steps(resumed, range(6, 11))
  resumed.finish()
  a = (tmp_path / "a" / "metrics.jsonl").read_text()
  assert a.count("\n") == 10
  assert (tmp_path / "b" / "metrics.jsonl").read_text() == a
