"""Continual learning: EWC and L2-SP, the replay buffer, the model registry
and promotion gate, rounds from the feedback store (resume after SIGKILL),
and the metrics of forgetting."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import data, tasks, train
from research.data import splits
from research.methods import ewc, l2_sp
from research.training import partition
from research.training.checkpointing import Checkpointer
from tests.test_train import _tiny_config

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "data",
                          "quickstart")


def _latest_params(workdir):
  with Checkpointer(workdir) as ckpt:
    _, state, _ = ckpt.restore(None)
  return state["params"]


def test_fisher_is_the_mean_of_squared_per_example_gradients(tiny_model_dir):
  """EWC's diagonal, through DP-SGD's per-example machinery, equals a loop
  of one `jax.grad` per example, squared and averaged (padding rows: none
  counted)."""
  config = _tiny_config(tiny_model_dir, **{"data.max_length": 32})
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  task = tasks.load(config, tokenizer)
  model_cfg, graphdef, params, frozen = train.load_model(
      config, task, [], str(tiny_model_dir))
  del model_cfg
  split = splits.load_file(config, tokenizer, task,
                           os.path.join(QUICKSTART, "dev.tsv"), "fisher",
                           ["negative", "positive"]).head(7)
  # Batches of 4: the second holds 3 examples and a padding row.
  got = ewc.fisher_diagonal(task, graphdef, params, frozen, split, 4,
                            chunk_size=2)

  def loss(p, example):
    model = partition.merge(graphdef, p, frozen)
    losses, weights = task.loss(task.forward(model, example), example)
    return (losses * weights).sum() / weights.sum()

  batcher = data.Batcher(split, 1, (), shuffle=False)
  grad = jax.jit(jax.grad(loss))  # one program; eager op-by-op is slow
  squares = []
  for batch in batcher.eval_batches():
    g = grad(params, {k: jnp.asarray(v) for k, v in batch.items()})
    squares.append(jax.tree.map(jnp.square, g))
  want = jax.tree.map(lambda *x: sum(x) / len(x), *squares)
  assert len(squares) == 7
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                               atol=1e-12)
  assert max(float(jnp.max(x)) for x in jax.tree.leaves(got)) > 0


@pytest.mark.slow
def test_ewc_and_l2_sp_with_weight_zero_equal_naive_fine_tuning(
    tmp_path, tiny_model_dir, compilation_cache):
  """Same seed, same data: the penalty's gradient is 0 at weight 0, so the
  trained weights are those without the method (to rounding); with weight
  > 0 they stay closer to the start, by the distance each one weighs
  (L2-SP: plain; EWC: Fisher-weighted)."""
  del compilation_cache
  fisher_file = os.path.join(QUICKSTART, "dev.tsv")
  base = {"total_steps": 16, "eval_every_steps": 16, "data.max_length": 32,
          "data.buckets": (32,)}
  ewc_options = {"fisher_file": fisher_file, "fisher_examples": 16}
  runs = {}
  for name, methods, options in (
      ("naive", (), {}),
      ("ewc0", ("ewc",), {"ewc": {"weight": 0.0, **ewc_options}}),
      ("l2sp0", ("l2_sp",), {"l2_sp": {"weight": 0.0}}),
      ("ewc", ("ewc",), {"ewc": {"weight": 100.0, **ewc_options}}),
      ("l2sp", ("l2_sp",), {"l2_sp": {"weight": 100.0}})):
    config = _tiny_config(tiny_model_dir, **base)
    config.methods = methods
    config.method_options = options
    train.train_and_evaluate(config, str(tmp_path / name))
    runs[name] = _latest_params(str(tmp_path / name))
  naive = jax.tree.leaves(runs["naive"])
  for name in ("ewc0", "l2sp0"):
    # Equal to float32 rounding, not bit for bit: the penalty's term makes a
    # different program, which XLA may fuse and round differently (1.5e-9
    # after 16 steps with XLA:CPU's classic emitters, tests/conftest.py).
    for a, b in zip(naive, jax.tree.leaves(runs[name]), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-8)
  # The start and the Fisher: as the runs computed them.
  config = _tiny_config(tiny_model_dir, **base)
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  task = tasks.load(config, tokenizer)
  _, graphdef, start, frozen = train.load_model(config, task, [],
                                                str(tiny_model_dir))
  fisher = ewc.fisher_diagonal(task, graphdef, start, frozen, splits.load_file(
      config, tokenizer, task, fisher_file, "fisher",
      ["negative", "positive"]).head(16), 32)
  plain = {n: float(l2_sp.penalty(runs[n], start)) for n in ("naive", "l2sp")}
  weighted = {n: float(l2_sp.penalty(runs[n], start, fisher))
              for n in ("naive", "ewc")}
  assert plain["l2sp"] < 0.5 * plain["naive"], plain
  assert weighted["ewc"] < 0.5 * weighted["naive"], weighted


# --- Replay, metrics -------------------------------------------------------------


def test_the_reservoir_holds_a_uniform_sample_and_resumes_from_its_state():
  """2,000 streams of 100 items into a reservoir of 10: each item is kept
  with probability 1/10 whatever its position (chi-square), and a
  reservoir rebuilt from `state()` continues exactly."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  from research.continual.replay import Reservoir
  counts = np.zeros(100)
  for trial in range(2000):
    r = Reservoir(10, seed=trial)
    r.add(range(100))
    assert len(r.items) == 10 and len(set(r.items)) == 10
    counts[r.items] += 1
  assert stats.chisquare(counts).pvalue > 1e-3, counts
  # The first and the last tenth are kept equally often (no order bias).
  assert abs(counts[:10].mean() - counts[-10:].mean()) < 40
  a = Reservoir(10, seed=3)
  a.add(range(50))
  b = Reservoir(10, state=json.loads(json.dumps(a.state())))
  a.add(range(50, 120))
  b.add(range(50, 120))
  assert a.items == b.items and a.seen == b.seen == 120
  # Drawing does not move the reservoir, and is the same for the same seed.
  assert a.sample(4, seed=(0, 1)) == a.sample(4, seed=(0, 1))
  assert a.state() == b.state()


def test_forgetting_backward_transfer_and_gain():
  """On a hand-made score matrix (rows: after rounds 0..3)."""
  from research.continual import metrics
  scores = [[0.80, 0.70], [0.82, 0.74], [0.76, 0.78], [0.78, 0.80]]
  assert metrics.forgetting(scores, 0) == pytest.approx(0.82 - 0.78)
  assert metrics.forgetting(scores, 0, t=2) == pytest.approx(0.82 - 0.76)
  assert metrics.forgetting(scores, 0, t=0) == 0.0
  # Data set 0 learned at round 0, data set 1 at round 1: (-0.02 + 0.06) / 2.
  assert metrics.backward_transfer(scores, {0: 0, 1: 1}) == pytest.approx(
      0.02)
  assert metrics.backward_transfer(scores, {1: 3}) == 0.0  # learned last
  assert metrics.gain(scores, 1) == pytest.approx(0.10)


# --- Rounds, registry, gate --------------------------------------------------------

LABELS = ("negative", "positive")


def _quickstart_rows(n):
  with open(os.path.join(QUICKSTART, "train.tsv"), encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t") for line in f][1:]
  return [{"sentence": s, "label": y} for s, y in rows[:n]]


def _feedback_db(path, rows, flip=False):
  """A feedback store as research.serve leaves it: each sentence served
  (a prediction row), then its label sent back (flipped: a bad annotator)."""
  from research.serve.store import FeedbackStore, PredictionRecord
  url = f"sqlite:///{path}"
  with FeedbackStore.open(url) as store:
    store.add_predictions([PredictionRecord(
        f"p{i}", "base", "sequence_classification", {"text": r["sentence"]},
        {"label": "negative"}) for i, r in enumerate(rows)])
    for i, r in enumerate(rows):
      label = LABELS[1 - LABELS.index(r["label"])] if flip else r["label"]
      store.add_feedback(f"p{i}", label=label)
  return url


def stream_config(model_dir, base, db, registry, new_file, epochs=8.0,
                  **continual):
  """A tiny model's rounds: 16 examples, 8 epochs of 2 steps, lr 3e-3."""
  config = _tiny_config(model_dir, **{
      "optimizer.learning_rate": 3e-3, "num_epochs": epochs, "batch_size": 8,
      "data.max_length": 32, "data.buckets": (32,), "keep_checkpoints": 1})
  c = config.continual
  c.registry, c.base, c.feedback_db = str(registry), str(base), db
  c.round_size, c.rounds = 16, 1
  c.old_eval_file = os.path.join(QUICKSTART, "dev.tsv")
  c.new_eval_file = str(new_file)
  c.max_forgetting = 0.2
  config.continual.update(continual)
  return config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model_dir):
  """The deployed model: the tiny BERT after 8 quickstart steps."""
  workdir = str(tmp_path_factory.mktemp("continual") / "base")
  config = _tiny_config(tiny_model_dir, **{
      "total_steps": 8, "data.max_length": 32, "data.buckets": (32,)})
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_the_gate_refuses_flipped_feedback_promotes_correct_and_rolls_back(
    tmp_path, tiny_model_dir, base_run, capsys):
  """Feedback with flipped labels (32 sentences, 16 epochs) makes a worse
  candidate: refused, the base stays current. Correct feedback on the same
  sentences: promoted
  (held-out accuracy on them up, the old dev set within max_forgetting),
  and one command rolls it back. A version scores as its run did."""
  from research.continual import gate, registry as registry_lib, rounds
  rows = _quickstart_rows(32)
  new_file = tmp_path / "new.tsv"
  new_file.write_text("sentence\tlabel\n" + "".join(
      f"{r['sentence']}\t{r['label']}\n" for r in rows))
  reg = tmp_path / "registry"
  bad = rounds.Stream(stream_config(
      tiny_model_dir, base_run, _feedback_db(tmp_path / "bad.db", rows, True),
      reg, new_file, 16.0, round_size=32), str(tmp_path / "bad")).run()
  registry = registry_lib.Registry(str(reg))
  (record,) = bad["rounds"]
  assert record["candidate"] == "v0002" and not record["promoted"]
  assert record["gate"]["gain"] < 0, record
  assert registry.current() == "v0001" == bad["current"]
  assert registry.metadata("v0001")["kind"] == "base"
  with pytest.raises(registry_lib.RegistryError, match="nothing to roll back"):
    registry.rollback()

  good = rounds.Stream(stream_config(
      tiny_model_dir, base_run, _feedback_db(tmp_path / "good.db", rows),
      reg, new_file, 16.0, round_size=32), str(tmp_path / "good")).run()
  (record,) = good["rounds"]
  assert record["start"] == "v0001" and record["candidate"] == "v0003"
  assert record["promoted"] and record["gate"]["gain"] > 0.1, record
  assert registry.current() == "v0003"
  # The version is the round's model: re-scored from its directory, the
  # same held-out numbers the round recorded.
  again = gate.evaluate(registry.path("v0003"),
                        {"new": str(new_file)})
  assert again["new/accuracy"] == pytest.approx(
      registry.metadata("v0003")["metrics"]["new/accuracy"])
  # Shadow replay of the 32 logged requests: a model agrees with itself;
  # the promoted candidate (accuracy 0.56 -> 1.0 on these sentences) must
  # answer some of them differently, and the changes it names are real.
  from research.serve.store import FeedbackStore  # pylint: disable=import-outside-toplevel
  with FeedbackStore.open(f"sqlite:///{tmp_path / 'good.db'}") as store:
    same = gate.shadow(store, registry.path("v0001"), registry.path("v0001"))
    moved = gate.shadow(store, registry.path("v0001"), registry.path("v0003"))
  assert same["requests"] == moved["requests"] == 32
  assert same["agreement"] == 1.0 and not same["changed"]
  assert moved["agreement"] < 1.0 and moved["changed"]
  change = moved["changed"][0]
  assert change["current"]["label"] != change["candidate"]["label"]
  assert registry_lib.main(["rollback", str(reg), "--reason", "test"]) == 0
  assert "current: v0001" in capsys.readouterr().out
  assert registry.current() == "v0001"
  assert [e["event"] for e in registry.history()] == ["promote", "promote",
                                                      "rollback"]
  # Labels the model does not have are skipped, each named in the manifest.
  assert record["data"]["skipped"] == 0


def _weights(version_dir):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(os.path.join(version_dir, "model", "model.safetensors"))


@pytest.mark.slow
def test_sigkill_during_a_round_resumes_exactly_and_feeds_each_correction_once(
    tmp_path, tiny_model_dir, base_run, compilation_cache):
  """Two rounds of 16 corrections through the CLI; one stream is killed
  (SIGKILL) inside round 2's training and rerun. Its rounds saw the same
  feedback ids as the uninterrupted stream's, each exactly once, and its
  final version has the same weights, array for array."""
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from tests import test_reliability as rel  # pylint: disable=import-outside-toplevel
  rows = _quickstart_rows(32)
  db = _feedback_db(tmp_path / "fb.db", rows)
  new_file = os.path.join(QUICKSTART, "dev.tsv")
  module = tmp_path / "stream_experiment.py"
  module.write_text(
      "from tests.test_continual import stream_config\n"
      "def get_config(arg):\n"
      f"  c = stream_config({str(tiny_model_dir)!r}, {base_run!r}, {db!r}, "
      f"arg, {new_file!r}, rounds=2, replay_ratio=0.5, promote='always')\n"
      "  c.checkpoint_every_steps = 1\n"
      "  return c\n")
  cache = compilation_cache  # the session's (conftest.py)

  def command(name):
    return [sys.executable, "-m", "research.continual", "--config",
            f"{module}:{tmp_path / ('registry_' + name)}",
            "--workdir", str(tmp_path / name)]

  for name in ("straight", "killed"):
    log_path = tmp_path / f"{name}.log"
    proc = rel._start(command(name), cache, log_path)
    if name == "killed":
      ckpt = tmp_path / name / "rounds" / "r002" / "run" / "checkpoints" / "4"
      deadline = time.monotonic() + 300
      while not ckpt.is_dir():
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      assert json.loads((tmp_path / name / "state.json").read_text())[
          "round"] == 1
      proc = rel._start(command(name), cache, tmp_path / "resumed.log")
    assert proc.wait(timeout=600) == 0, log_path.read_text()[-3000:]
  assert "resumed from step" in (tmp_path / "resumed.log").read_text()
  ids = {}
  for name in ("straight", "killed"):
    state = json.loads((tmp_path / name / "state.json").read_text())
    assert state["round"] == 2 and state["after"] == 32
    ids[name] = [json.loads((tmp_path / name / "rounds" / f"r{r:03d}" /
                             "data" / "manifest.json").read_text())["ids"]
                 for r in (1, 2)]
  assert ids["killed"] == ids["straight"]
  assert sorted(sum(ids["killed"], [])) == list(range(1, 33))
  a = _weights(os.path.join(tmp_path / "registry_straight", "versions",
                            "v0003"))
  b = _weights(os.path.join(tmp_path / "registry_killed", "versions",
                            "v0003"))
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
