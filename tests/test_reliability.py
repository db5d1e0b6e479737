"""Failure behaviour of `research.train`, end to end on the tiny BERT.

Exact resume after SIGKILL, determinism, SIGTERM preemption, interrupted
saves, non-finite losses, bad configs, bad input rows, full disks, W&B
outages and safe loading. README's "Failure behaviour" states the policies
these tests hold the trainer to.

Most tests compare against one straight run of the shared config (`straight`).
Every run builds new jitted functions, so the session's persistent XLA cache
(conftest's `compilation_cache`, also passed to subprocesses) keeps the file
fast; the executables it returns are the ones a fresh compile would give.
"""

import errno
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
from orbax.checkpoint._src.path import atomicity
import pytest

from research import data
from research import cli, train
from research.configs import ConfigError
from research.parallelism import ParallelismError
from research.training import tracker
from research.training.checkpointing import Checkpointer
from tests.test_train import _metrics, _tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart"

# The shared run: 60 steps, a log line every 5, eval and checkpoint every 10.
# One bucket and one total_steps (the schedule is compiled in) everywhere:
# fewer programs to compile, and the cache serves them to every test.
BASE = {"total_steps": 60, "log_every_steps": 5, "eval_every_steps": 10,
        "checkpoint_every_steps": 10, "data.max_length": 32,
        "data.buckets": (32,)}


def _config(model_dir, **overrides):
  return _tiny_config(model_dir, **{**BASE, **overrides})


def _cli(model_dir, workdir, **overrides):
  """`python -m research.train` arguments giving exactly `_config`."""
  values = {"model.name": str(model_dir), "wandb.mode": "disabled",
            "parallelism.mesh_shape": (1, 1, 1),
            "optimizer.learning_rate": 1e-3, **BASE, **overrides}
  return [sys.executable, "-m", "research.train",
          "--config", "experiments/quickstart.py",
          *[f"--config.{k}={v}" for k, v in values.items()],
          f"--workdir={workdir}"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, compilation_cache):
  """The shared config run once without interruption: the reference."""
  del compilation_cache
  workdir = tmp_path_factory.mktemp("straight")
  train.train_and_evaluate(_config(tiny_model_dir), str(workdir))
  return workdir


def _env(cache):
  return dict(os.environ, WANDB_MODE="disabled",
              JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _start(args, cache, log_path):
  """Starts a CLI run in the background, its output going to `log_path`."""
  with open(log_path, "w") as log:
    return subprocess.Popen(args, cwd=REPO, env=_env(cache), stdout=log,
                            stderr=subprocess.STDOUT)


def _wait_for_step_dir(proc, workdir, step, log_path, timeout=300):
  """Waits until checkpoint `step` is committed (renamed from its tmp name)."""
  final = pathlib.Path(workdir) / "checkpoints" / str(step)
  deadline = time.monotonic() + timeout
  while not final.is_dir():
    assert proc.poll() is None, (
        f"run exited ({proc.returncode}) before checkpoint {step}:\n"
        + pathlib.Path(log_path).read_text()[-3000:])
    assert time.monotonic() < deadline, f"no checkpoint {step} in {timeout}s"
    time.sleep(0.02)
  # Killing a finished run would test nothing.
  assert proc.poll() is None, "the run finished before it could be stopped"


def _kill_after_checkpoint(args, cache, workdir, log_path, step):
  """Starts the CLI run and SIGKILLs it once checkpoint `step` is on disk."""
  proc = _start(args, cache, log_path)
  try:
    _wait_for_step_dir(proc, workdir, step, log_path)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  return proc


def _steps_on_disk(workdir):
  """Committed checkpoint steps, read without opening (and cleaning) them."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints")
                .iterdir() if p.name.isdigit())


def _restore(workdir, step=None):
  """(step, state, extras) of a checkpoint, restored without a target."""
  with Checkpointer(workdir) as ckpt:
    return ckpt.restore(None, step=step)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
  a, b = _leaves(a), _leaves(b)
  assert len(a) == len(b) > 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def _assert_same_as(workdir, reference):
  """Same last checkpoint (params, optimiser state, extras) and metrics."""
  step_a, state_a, extras_a = _restore(reference)
  step_b, state_b, extras_b = _restore(workdir)
  assert step_a == step_b == BASE["total_steps"]
  assert extras_a == extras_b
  _assert_trees_equal(state_a, state_b)
  metrics_a, metrics_b = _metrics(reference), _metrics(workdir)
  assert [r["step"] for r in metrics_a] == [r["step"] for r in metrics_b]
  assert metrics_a == metrics_b


# --- 1-4: resume, determinism, preemption, interrupted saves ------------------


def test_sigkill_then_same_command_resumes_exactly(
    tmp_path, tiny_model_dir, straight, compilation_cache):
  """Killed (SIGKILL) after checkpoint 10 wherever it then was; rerun."""
  workdir, log_path = tmp_path / "run", tmp_path / "killed.log"
  args = _cli(tiny_model_dir, workdir)
  proc = _kill_after_checkpoint(args, compilation_cache, workdir, log_path, 10)
  assert proc.returncode == -signal.SIGKILL
  assert not (workdir / "summary.json").exists()
  resume_from = _steps_on_disk(workdir)[-1]
  assert 10 <= resume_from < BASE["total_steps"]

  out = subprocess.run(args, cwd=REPO, env=_env(compilation_cache),
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step {resume_from}" in out.stderr
  # Parameters, optimiser state, data position (same batches, hence same
  # losses), dropout keys and the metrics file all match the straight run.
  _assert_same_as(workdir, straight)


def test_same_config_twice_gives_identical_losses(
    tmp_path, tiny_model_dir, straight):
  train.train_and_evaluate(_config(tiny_model_dir), str(tmp_path))
  losses = [[r["train/loss"] for r in _metrics(d) if "train/loss" in r]
            for d in (straight, tmp_path)]
  assert len(losses[0]) == BASE["total_steps"] // BASE["log_every_steps"]
  assert losses[0] == losses[1]
  assert len(set(losses[0])) > 1  # the model did train
  _assert_same_as(tmp_path, straight)


def test_sigterm_saves_current_step_exits_143_then_resumes(
    tmp_path, tiny_model_dir, straight, compilation_cache, caplog):
  workdir, log_path = tmp_path / "run", tmp_path / "terminated.log"
  proc = _start(_cli(tiny_model_dir, workdir), compilation_cache, log_path)
  try:
    _wait_for_step_dir(proc, workdir, 10, log_path)
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=300)
  finally:
    proc.kill()
    proc.wait()
  output = log_path.read_text()
  assert returncode == train.PREEMPTED_EXIT_CODE == 143, output[-3000:]
  saved = int(re.search(r"preempted: saved step (\d+) in ", output).group(1))
  assert "Traceback" not in output
  # Saved at the step it was at when the signal came, not the last periodic one.
  assert _steps_on_disk(workdir)[-1] == saved >= 10
  assert _restore(workdir)[0] == saved

  caplog.set_level("INFO", logger="research.train")
  train.train_and_evaluate(_config(tiny_model_dir), str(workdir))
  assert f"resumed from step {saved} " in caplog.text
  _assert_same_as(workdir, straight)


class _Crash(Exception):
  """Stands in for a process dying with nothing saved."""


def test_interrupted_save_is_never_restored(
    tmp_path, tiny_model_dir, straight, monkeypatch, caplog):
  config, workdir = _config(tiny_model_dir), str(tmp_path)
  real = Checkpointer.reached_preemption

  def crash_at_7(self, step):
    if step == 7:
      raise _Crash()
    return real(self, step)

  # A crash before the first checkpoint: the rerun starts over and must not
  # append to the metrics the dead attempt logged (step 5).
  monkeypatch.setattr(Checkpointer, "reached_preemption", crash_at_7)
  with pytest.raises(_Crash):
    train.train_and_evaluate(config, workdir)
  assert [r["step"] for r in tracker.read_jsonl(tmp_path / "metrics.jsonl")
          ] == [5]
  # Preempted at 13, between two log lines: the open loss window is saved.
  monkeypatch.setattr(Checkpointer, "reached_preemption",
                      lambda self, step: step == 13 or real(self, step))
  with pytest.raises(train.Preempted, match="saved step 13"):
    train.train_and_evaluate(config, workdir)
  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  assert _steps_on_disk(workdir) == [10, 13]

  # What a kill in the middle of saving step 20 leaves: a temporary
  # directory with partial data and no commit markers.
  partial = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "checkpoints" / "13", partial)
  for marker in partial.rglob("commit_success.txt"):
    marker.unlink()
  for chunk in (partial / "state").rglob("d/*"):
    chunk.write_bytes(chunk.read_bytes()[:7])
  assert _steps_on_disk(workdir) == [10, 13]

  caplog.set_level("INFO", logger="research.train")
  train.train_and_evaluate(config, workdir)
  assert "resumed from step 13 " in caplog.text
  assert not partial.exists()  # removed on open, never read
  _assert_same_as(workdir, straight)


# --- 5: non-finite losses ----------------------------------------------------------


def _regression_tsv(path, label=None):
  """The quickstart sentences with a score (1.0 positive, 0.0 negative)."""
  lines = (QUICKSTART / "train.tsv").read_text().splitlines()
  header = lines[0].split("\t")
  text, polarity = header.index("sentence"), header.index("label")
  rows = ["sentence\tscore"]
  for line in lines[1:]:
    fields = line.split("\t")
    score = label if label is not None else (
        "1.0" if fields[polarity] == "positive" else "0.0")
    rows.append(f"{fields[text]}\t{score}")
  path.write_text("\n".join(rows) + "\n")
  return str(path)


def _regression_config(model_dir, train_file, **overrides):
  return _config(model_dir, num_labels=1, **{
      "data.train_file": train_file, "data.eval_file": "",
      "data.label_field": "score", "data.label_names": (), **overrides})


def test_non_finite_losses_are_skipped_counted_then_stop_the_run(
    tmp_path, tiny_model_dir, monkeypatch):
  # A label of 1e20 fits in float32 but its squared error does not: the loss
  # is inf while the gradients stay finite.
  bad_steps = {3, 6, 7, 8, 9, 10}
  real = data.Batcher.batch_at

  def batch_at(self, step):
    batch = real(self, step)
    if self.shuffle and step + 1 in bad_steps:  # batch s trains step s + 1
      batch["labels"] = np.full_like(batch["labels"], 1e20)
    return batch

  monkeypatch.setattr(data.Batcher, "batch_at", batch_at)
  config = _regression_config(
      tiny_model_dir, _regression_tsv(tmp_path / "train.tsv"),
      log_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=20,
      max_bad_steps=3)
  with pytest.raises(train.TrainingError) as stop:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(stop.value)
  assert message.startswith("step 8: 3 consecutive non-finite losses "
                            "(steps 6-8; config.max_bad_steps=3)")
  assert "the last checkpoint is step 8" in message

  rows = {r["step"]: r for r in _metrics(tmp_path / "run")}
  assert sorted(rows) == list(range(1, 9))
  assert [rows[s]["train/bad_steps_total"] for s in range(1, 9)] == [
      0, 0, 1, 1, 1, 2, 3, 4]
  assert math.isinf(rows[3]["train/loss"]) and math.isfinite(rows[4]["train/loss"])

  states = {s: _restore(tmp_path / "run", s)[1] for s in (2, 3, 4, 5, 8)}
  # A skipped step changes neither parameters nor Adam's moments and count;
  # only the non-finite counters move.
  _assert_trees_equal(states[2]["params"], states[3]["params"])
  floats = lambda s: [x for x in _leaves(states[s]["opt_state"])
                      if x.dtype.kind == "f"]
  for a, b in zip(floats(2), floats(3)):
    np.testing.assert_array_equal(a, b)
  assert any((a != b).any() for a, b in zip(_leaves(states[3]["params"]),
                                           _leaves(states[4]["params"])))
  # Stopped with the parameters of step 5, the last good one.
  _assert_trees_equal(states[5]["params"], states[8]["params"])


def test_all_labels_overflowing_stop_the_cli_with_exit_2(
    tmp_path, tiny_model_dir, capsys):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  config = _regression_config(
      tiny_model_dir, _regression_tsv(tmp_path / "train.tsv", label="1e20"),
      checkpoint_every_steps=1, max_bad_steps=2)
  assert cli.run(config, str(tmp_path / "run")) == 2
  err = capsys.readouterr().err
  assert "error: step 2: 2 consecutive non-finite losses (steps 1-2; " \
      "config.max_bad_steps=2)" in err
  assert "Traceback" not in err
  model, _ = hf.load_pretrained(str(tiny_model_dir), "sequence_classification",
                                1, seed=config.seed)
  _assert_trees_equal(nnx.state(model, nnx.Param),
                      _restore(tmp_path / "run")[1]["params"])


# --- 6: bad configs ---------------------------------------------------------------


def _misspelt(c):
  c.unlock()
  c.optimizer.lerning_rate = 1e-3


def _wrong_type(c):
  with c.ignore_type():
    c.batch_size = "16"


def _hf_offline(c, monkeypatch):
  import datasets  # pylint: disable=import-outside-toplevel
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  # No network in tests: say so, as HF_HUB_OFFLINE=1 would, rather than
  # waiting for retries.
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  c.data.source, c.data.name = "hf", "nobody/no-such-dataset"
  c.data.train_file = c.data.eval_file = ""


BAD_CONFIGS = {
    "misspelt field": (_misspelt, ConfigError, [
        "config.optimizer.lerning_rate is not a known field; did you mean "
        "config.optimizer.learning_rate?"]),
    "wrong type": (_wrong_type, ConfigError, [
        "config.batch_size='16' has type str; expected int"]),
    "batch size vs devices": (
        {"parallelism.mesh_shape": (-1, 1, 1), "batch_size": 12},
        ParallelismError,
        ["config.batch_size=12 is not divisible by the data-parallel size 8"]),
    "warmup longer than the run": (
        {"total_steps": 5, "optimizer.warmup_steps": 10}, ConfigError,
        ["config.optimizer.warmup_steps gives 10 warmup steps, more than the "
         "5 optimizer steps"]),
    "missing local file": (
        {"data.eval_file": "/no/such/dev.tsv"}, ConfigError,
        ["config.data.eval_file='/no/such/dev.tsv': no such file"]),
    "unknown tfds dataset": (
        {"data.source": "tfds", "data.name": "glue_typo/sst2"}, data.DataError,
        ["config.data.name='glue_typo/sst2'", "not found", "close names: glue"]),
    "hf dataset offline": (_hf_offline, data.DataError, [
        "hf nobody/no-such-dataset split 'train': cannot load "
        "(config.data.name='nobody/no-such-dataset'", "offline"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fails_before_compiling_naming_the_field(
    tmp_path, tiny_model_dir, monkeypatch, capsys, case):
  change, error, fragments = BAD_CONFIGS[case]
  if case == "unknown tfds dataset":
    pytest.importorskip("tensorflow_datasets")
  config = _config(tiny_model_dir)
  if isinstance(change, dict):
    config.update_from_flattened_dict(change)
  elif change is _hf_offline:
    pytest.importorskip("datasets")
    change(config, monkeypatch)
  else:
    change(config)

  def never(*args, **kwargs):
    raise AssertionError("compiled despite a bad config")

  monkeypatch.setattr(train, "make_train_step", never)
  monkeypatch.setattr(train, "make_eval_step", never)
  with pytest.raises(error) as e:
    train.train_and_evaluate(config, str(tmp_path / "direct"))
  for fragment in fragments:
    assert fragment.lower() in str(e.value).lower(), str(e.value)
  # The command line prints the same message, without a traceback.
  assert cli.run(config, str(tmp_path / "cli")) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and fragments[0] in err
  assert "Traceback" not in err
  for workdir in ("direct", "cli"):
    assert not (tmp_path / workdir / "checkpoints").exists()
    assert not (tmp_path / workdir / "metrics.jsonl").exists()


# --- 7: bad input rows --------------------------------------------------------------

MEGABYTE_TEXT = ("lengthy " * (1 << 17))[:1 << 20].strip()


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl"])
def test_megabyte_line_is_truncated_and_nul_byte_is_a_bad_row(
    tmp_path, tiny_model_dir, fmt):
  rows = [("fine day", "positive"), (MEGABYTE_TEXT, "negative"),
          ("nul\0byte", "positive"), ("good", "negative")]
  if fmt == "jsonl":
    text = "\n".join(json.dumps({"sentence": s, "label": l}) for s, l in rows)
  else:
    sep = "\t" if fmt == "tsv" else ","
    text = "\n".join(f"sentence{sep}label" if i < 0 else sep.join(rows[i])
                     for i in range(-1, len(rows)))
  path = tmp_path / f"train.{fmt}"
  path.write_text(text + "\n")
  config = _config(tiny_model_dir, **{"data.train_file": str(path),
                                      "data.eval_file": ""})
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  line = 3 if fmt == "jsonl" else 4  # the NUL row; files have a header line
  with pytest.raises(data.DataError,
                     match=re.escape(f"{path}, line {line}: column 'sentence' "
                                     "contains a NUL byte")):
    data.load_splits(config, tokenizer)
  config.data.bad_rows = "skip"
  split, _, _, skipped = data.load_splits(config, tokenizer)
  assert skipped == {"train": {"NUL byte": 1}}
  assert list(split.rows) == ([1, 2, 4] if fmt == "jsonl" else [2, 3, 5])
  assert list(split.lengths) == [4, 32, 3]  # the long one cut at max_length


def test_label_overflowing_float32_is_a_bad_row(tmp_path, tiny_model_dir):
  path = tmp_path / "train.tsv"
  path.write_text("sentence\tscore\nfine\t1e20\nhuge\t1e39\ngood\t0.5\n")
  config = _regression_config(tiny_model_dir, str(path))
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  # 1e39 would become inf in the float32 label array; 1e20 is representable
  # (its squared error is not: that is a training-time non-finite loss).
  with pytest.raises(data.DataError, match=re.escape(
      f"{path}, line 3: label '1e39' overflows float32")):
    data.load_splits(config, tokenizer)
  config.data.bad_rows = "skip"
  split, _, _, skipped = data.load_splits(config, tokenizer)
  assert skipped == {"train": {"unknown label": 1}}
  np.testing.assert_array_equal(split.labels, np.float32([1e20, 0.5]))


def test_bad_rows_skipped_counted_and_reported_end_to_end(
    tmp_path, tiny_model_dir):
  bad = [b"\tpositive", b"   \tnegative", b"caf\xe9 au lait\tpositive",
         b"nul\0byte\tnegative", b"fine day\t", b"fine day\tneutral",
         b"fine\tday\tpositive"]
  # The long line is data, not a bad row: it trains truncated.
  long_line = MEGABYTE_TEXT.encode() + b"\tpositive"
  for name, extra in (("train.tsv", bad + [long_line]), ("dev.tsv", bad[:2])):
    good = (QUICKSTART / name).read_bytes().rstrip(b"\n").split(b"\n")
    (tmp_path / name).write_bytes(b"\n".join(good[:3] + extra + good[3:])
                                  + b"\n")
  config = _config(tiny_model_dir, **{
      "data.train_file": str(tmp_path / "train.tsv"),
      "data.eval_file": str(tmp_path / "dev.tsv"), "data.bad_rows": "skip"})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  expected = {"data/skipped/train/empty_text": 2,
              "data/skipped/train/invalid_UTF-8": 1,
              "data/skipped/train/NUL_byte": 1,
              "data/skipped/train/missing_label": 1,
              "data/skipped/train/unknown_label": 1,
              "data/skipped/train/ragged_row": 1,
              "data/skipped/validation/empty_text": 2}
  assert {k: v for k, v in summary.items() if k.startswith("data/")} == expected
  recorded = json.loads((tmp_path / "run" / "metrics_summary.json").read_text())
  assert {k: recorded[k] for k in expected} == expected
  on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert {k: on_disk[k] for k in expected} == expected
  # Fixed shapes: no more programs than buckets, whatever the rows held.
  assert summary["final_step"] == BASE["total_steps"]
  assert math.isfinite(summary["eval/loss"])
  assert summary["train_step_compilations"] == len(BASE["data.buckets"])


# --- 8: full or read-only disk ------------------------------------------------------


def test_failed_saves_stop_with_message_keep_last_good_and_resume(
    tmp_path, tiny_model_dir, straight, monkeypatch, capsys):
  """Commits (the rename that makes a step final) fail as on a full disk.

  The save of step 20 fails in the background and surfaces at the next save;
  the save of step 60, the last, surfaces while the run shuts down.
  """
  real = atomicity.on_commit_callback
  full_at = set()

  async def commit(tmp_dir, **kwargs):
    if int(tmp_dir.get().name.split(".")[0]) in full_at:
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_dir.get()))
    return await real(tmp_dir, **kwargs)

  monkeypatch.setattr(atomicity, "on_commit_callback", commit)
  config, workdir = _config(tiny_model_dir), tmp_path / "run"
  sigterm_handler = signal.getsignal(signal.SIGTERM)
  for fail_step in (20, 60):
    full_at.add(fail_step)
    assert cli.run(config, str(workdir)) == 2
    # Shut down in full despite the error: the SIGTERM handler is put back.
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler
    err = capsys.readouterr().err
    assert f"error: Saving checkpoint step {fail_step} to " \
        f"{workdir / 'checkpoints' / str(fail_step)} failed: OSError: " \
        "[Errno 28] No space left on device" in err
    assert "Traceback" not in err
    assert not (workdir / "summary.json").exists()
    full_at.clear()  # space freed
    # The previous checkpoint is intact and is where the rerun starts.
    last_good = fail_step - BASE["checkpoint_every_steps"]
    assert _steps_on_disk(workdir)[-1] == last_good
    assert _restore(workdir)[0] == last_good
  train.train_and_evaluate(config, str(workdir))
  _assert_same_as(workdir, straight)


# --- 9: W&B ---------------------------------------------------------------------------


class _FlakyRun:
  """A W&B run whose network goes away at the first log call."""
  id = "flaky"

  class config:  # pylint: disable=invalid-name
    update = staticmethod(lambda *args, **kwargs: None)

  def log(self, values, step):
    raise ConnectionError("network is unreachable")

  def finish(self):
    pass


def test_wandb_failures_never_stop_training(tmp_path, tiny_model_dir,
                                            monkeypatch):
  import wandb  # pylint: disable=import-outside-toplevel
  modes = []

  def init(**kwargs):
    modes.append(kwargs["mode"])
    if kwargs["mode"] == "online":
      return _FlakyRun()
    raise wandb.errors.CommError("invalid API key")

  monkeypatch.setattr(wandb, "init", init)
  config = _config(tiny_model_dir, **{"wandb.mode": "online"})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    summary = train.train_and_evaluate(config, str(tmp_path))
  messages = [str(w.message) for w in caught
              if issubclass(w.category, RuntimeWarning)]
  assert any(m.startswith("W&B log failed in online mode (ConnectionError")
             for m in messages), messages
  assert any(m.startswith("W&B could not start in offline mode (CommError")
             for m in messages), messages
  assert modes == ["online", "offline"]
  assert summary["final_step"] == BASE["total_steps"]
  rows = tracker.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(5, 61, 5))
  assert [r["step"] for r in rows if "eval/accuracy" in r] == list(
      range(10, 61, 10))


def _wandb_records(path):
  """The records of a W&B transaction log (`run-<id>.wandb`), in order.

  wandb 0.31 has no Python reader for these files (its Go core reads them),
  so the framing is read here: LevelDB's log format, 32 KiB blocks of
  `<crc32 u32, length u16, type u8>` chunks after a 7-byte `:W&B` header.
  A last record cut short by a kill is left out.
  """
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  data, block, header = path.read_bytes(), 32768, 7
  assert data[:4] == b":W&B", path
  pos, parts = header, b""
  while pos + header <= len(data):
    if block - pos % block < header:  # block trailer
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
    if kind == 0 or pos + header + length > len(data):  # padding, or cut
      break
    chunk = data[pos + header:pos + header + length]
    pos += header + length
    parts = chunk if kind in (1, 2) else parts + chunk  # FULL/FIRST start
    if kind in (1, 4):  # FULL or LAST: a whole record
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      yield record


def _wandb_history(workdir):
  """The W&B run's history as `wandb sync` of its offline files leaves it.

  Each attempt of the run wrote its own offline run directory. Attempts are
  applied in the order they started; one that rewinds (`resume_from`, stored
  as the run record's branch point on the same run) first drops the rows
  after its step, as the W&B server does. A file that a kill left without
  even its run record adds nothing.

  Returns:
    (run ids, [(step, {key: value})] in history order, rows per attempt).
  """
  attempts = []
  for path in pathlib.Path(workdir).glob("wandb/offline-run-*/run-*.wandb"):
    run, rows = None, []
    for record in _wandb_records(path):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        run = record.run
      elif kind == "history":
        items = {item.key or "/".join(item.nested_key):
                 json.loads(item.value_json) for item in record.history.item}
        rows.append((record.history.step.num, {
            k: v for k, v in items.items() if not k.startswith("_")}))
    attempts.append((run.start_time.ToNanoseconds() if run else -1, run, rows))
  history, run_ids, counts = [], set(), []
  for _, run, rows in sorted(attempts, key=lambda a: a[0]):
    counts.append(len(rows))
    if run is None:
      continue
    run_ids.add(run.run_id)
    if run.branch_point.run == run.run_id:  # a rewind of this run
      history = [r for r in history if r[0] <= run.branch_point.value]
    history += rows
  return run_ids, history, counts


def test_wandb_history_after_sigkill_and_resume_has_every_step_once(
    tmp_path, tiny_model_dir, straight, compilation_cache):
  """Offline W&B, killed after checkpoint 10, rerun: W&B rewinds the run."""
  workdir, log_path = tmp_path / "run", tmp_path / "killed.log"
  args = _cli(tiny_model_dir, workdir, **{"wandb.mode": "offline"})
  _kill_after_checkpoint(args, compilation_cache, workdir, log_path, 10)
  resume_from = _steps_on_disk(workdir)[-1]
  run_id = (workdir / tracker.WANDB_RUN_ID_FILE).read_text().strip()
  out = subprocess.run(args, cwd=REPO, env=_env(compilation_cache),
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step {resume_from}" in out.stderr
  run_ids, rows, counts = _wandb_history(workdir)
  # The same run; the killed attempt's file kept at most what it logged
  # before the checkpoint plus a few steps (a SIGKILL loses W&B's buffer).
  assert run_ids == {run_id} and len(counts) == 2
  assert (workdir / tracker.WANDB_RUN_ID_FILE).read_text().strip() == run_id
  # Every logged step once, in order, with the values metrics.jsonl holds
  # (the file equals the straight run's, see _assert_same_as).
  expected = {}
  for record in tracker.read_jsonl(workdir / "metrics.jsonl"):
    expected.setdefault(record.pop("step"), {}).update(record)
  assert [step for step, _ in rows] == sorted(expected) == list(range(5, 61, 5))
  assert dict(rows) == expected
  _assert_same_as(workdir, straight)


# --- 10: safe loading ------------------------------------------------------------------


class _Payload:
  """Creates a file when unpickled: proof that something unpickled it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_no_unpickling_when_resuming(tmp_path, tiny_model_dir, straight,
                                     monkeypatch):
  """Checkpoints (orbax + JSON), labels.json and the token cache never unpickle.

  PyTorch checkpoints are read with `weights_only=True`;
  tests/test_hf.py::test_pytorch_bin_with_arbitrary_pickle_is_refused shows a
  pickle with arbitrary objects is refused there.
  """
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  caches = sorted((workdir / "cache").glob("*.npz"))
  assert len(caches) == 2  # train and dev
  marker = str(tmp_path / "unpickled")
  for path in caches:  # a planted cache file with a pickled object
    np.savez(path, meta=np.array([_Payload(marker)], dtype=object))

  def refuse(*args, **kwargs):
    raise AssertionError("something unpickled while resuming")

  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)
  summary = train.train_and_evaluate(_config(tiny_model_dir), str(workdir))
  assert not os.path.exists(marker)
  expected = json.loads((straight / "summary.json").read_text())
  assert summary["eval/accuracy"] == expected["eval/accuracy"]
  # The planted files were replaced by freshly tokenised ones.
  with np.load(caches[0], allow_pickle=False) as f:
    assert "tokens.input_ids" in f.files


def test_loading_code_never_allows_pickle():
  """The source never opts in to unpickling; torch.load pins weights_only."""
  sources = {p: p.read_text() for p in (REPO / "research").rglob("*.py")}
  for path, text in sources.items():
    # np.load refuses pickles unless told otherwise.
    for unsafe in ("allow_pickle=True", "weights_only=False", "pickle.load",
                   "dill.load", "cloudpickle"):
      assert unsafe not in text, f"{path}: {unsafe}"
    for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
      assert "weights_only=True" in call, f"{path}: {call}"
