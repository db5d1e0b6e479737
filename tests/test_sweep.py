"""research.sweep (grid, names, hosts, restart) and research.results (table)."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from research import sweep, train
from research.configs import default
from research import glue, results
from research.training.checkpointing import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = '''"""Test sweep: the tiny model on a local TSV, 2 lrs x 2 seeds.

    python -m research.sweep --config {path} --workdir DIR
"""

from research.configs import default


def get_config(arg=None):
  del arg
  c = default.get_config()
  c.model.name = {model!r}
  c.data.train_file = {train!r}
  c.data.eval_file = {dev!r}
  c.num_labels = 1  # Regression: correlations differ between any two runs.
  c.data.max_length = 16
  c.data.buckets = (16,)
  c.parallelism.mesh_shape = (1, 1, 1)
  c.batch_size = 8
  c.eval_batch_size = 16
  c.total_steps = 4
  c.eval_every_steps = 2
  c.log_every_steps = 2
  c.metrics = ("pearson", "spearman")
  c.eval_metric = "pearson"
  c.wandb.mode = "disabled"
  return c


def get_sweep(arg=None):
  del arg
  return {{"optimizer.learning_rate": [3e-3, 1e-4], "seed": [0, 1]}}
'''
RUNS = ["lr=0.003,seed=0", "lr=0.003,seed=1", "lr=0.0001,seed=0",
        "lr=0.0001,seed=1"]


@pytest.fixture
def experiment(tmp_path, tiny_model_dir):
  """Writes the test experiment and its data; returns the module's path."""
  rng = np.random.default_rng(0)
  words = ["good", "great", "bad", "awful", "the", "film"]
  for name, n in (("train.tsv", 32), ("dev.tsv", 16)):
    lines = ["sentence\tlabel"]
    for _ in range(n):
      text = rng.choice(words, size=5)
      score = sum(w in ("good", "great") for w in text)  # 0 to 5
      lines.append(" ".join(text) + f"\t{score}")
    (tmp_path / name).write_text("\n".join(lines) + "\n")
  path = tmp_path / "tiny_sweep.py"
  path.write_text(EXPERIMENT.format(path=path, model=str(tiny_model_dir),
                                    train=str(tmp_path / "train.tsv"),
                                    dev=str(tmp_path / "dev.tsv")))
  return str(path)


def test_grid_names_and_hosts():
  config = default.get_config()
  grid = {"optimizer.learning_rate": [5e-5, 2e-5], "seed": [0, 1, 2]}
  runs = sweep.expand(grid, config)
  assert [r.name for r in runs] == [
      "lr=5e-05,seed=0", "lr=5e-05,seed=1", "lr=5e-05,seed=2",
      "lr=2e-05,seed=0", "lr=2e-05,seed=1", "lr=2e-05,seed=2"]
  assert runs[4].overrides == {"optimizer.learning_rate": 2e-5, "seed": 1}
  assert [r.index for r in sweep.host_runs(runs, 1, 4)] == [1, 5]
  assert [r.index for r in sweep.host_runs(runs, 3, 4)] == [3]
  cfg = sweep.run_config(config, runs[4], "sst2_sweep")
  assert (cfg.optimizer.learning_rate, cfg.seed) == (2e-5, 1)
  assert (cfg.wandb.group, cfg.wandb.name) == ("sst2_sweep", "lr=2e-05,seed=1")
  assert config.seed == 0  # The base config is untouched.
  assert sweep.run_name({"batch_size": 16, "num_epochs": 2.0,
                         "data.text_fields": ("a", "b")}) == \
      "bs=16,epochs=2.0,text_fields=a-b"
  # Two fields with one short name keep their full names.
  assert sweep.format_overrides({"model.name": "x/y", "wandb.name": "z"}) == \
      "model.name=x_y,wandb.name=z"


def test_grid_errors_name_the_field():
  config = default.get_config()
  with pytest.raises(sweep.SweepError, match="config.optimizer.learnig_rate "
                     "is not a config field; did you mean "
                     "config.optimizer.learning_rate"):
    sweep.expand({"optimizer.learnig_rate": [1e-5]}, config)
  with pytest.raises(sweep.SweepError, match="seed needs a non-empty list"):
    sweep.expand({"seed": []}, config)
  with pytest.raises(sweep.SweepError, match="seed repeats a value"):
    sweep.expand({"seed": [1, 1]}, config)
  with pytest.raises(sweep.SweepError, match="host_index=2 must be in"):
    sweep.host_runs([], 2, 2)
  with pytest.raises(sweep.SweepError, match="--config.seed is swept"):
    sweep.check_overrides({"seed": [0, 1]}, {"seed": 3}, "x.py")


def _summary_mtimes(workdir):
  return {r: os.stat(os.path.join(workdir, r, "summary.json")).st_mtime_ns
          for r in RUNS if os.path.exists(os.path.join(workdir, r,
                                                       "summary.json"))}


def test_sweep_restarts_without_redoing_runs_and_tabulates(
    experiment, tmp_path, monkeypatch, caplog, compilation_cache):
  del compilation_cache
  module = sweep.load_experiment(experiment)
  config, grid = module.get_config(), module.get_sweep()
  workdir = str(tmp_path / "tiny_sweep")
  trained = []

  def counting_train(cfg, run_dir):
    trained.append(os.path.basename(run_dir))
    return train.train_and_evaluate(cfg, run_dir)

  # Preempt the second run at step 2 (what SIGTERM does): the sweep stops.
  real = Checkpointer.reached_preemption
  monkeypatch.setattr(
      Checkpointer, "reached_preemption",
      lambda self, step: (step == 2 and str(self.workdir).endswith(RUNS[1]))
      or real(self, step))
  with pytest.raises(train.Preempted, match="saved step 2"):
    sweep.run_sweep(config, grid, workdir, train_fn=counting_train)
  assert trained == RUNS[:2]
  first = _summary_mtimes(workdir)
  assert list(first) == RUNS[:1]
  with Checkpointer(os.path.join(workdir, RUNS[1])) as ckpt:
    assert ckpt.latest_step() == 2

  # Rerun: the finished run is skipped, the preempted one resumes at step 2.
  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  trained.clear()
  caplog.set_level(logging.INFO, logger="research.train")
  outcome = sweep.run_sweep(config, grid, workdir, train_fn=counting_train)
  assert [(r.name, status) for r, status in outcome] == [
      (RUNS[0], "skipped"), (RUNS[1], "trained"), (RUNS[2], "trained"),
      (RUNS[3], "trained")]
  assert trained == RUNS[1:]
  assert "resumed from step 2" in caplog.text
  done = _summary_mtimes(workdir)
  assert done[RUNS[0]] == first[RUNS[0]]
  for run in RUNS:
    with open(os.path.join(workdir, run, "config.json")) as f:
      run_config = json.load(f)
    assert run_config["wandb"]["group"] == "tiny_sweep"
    assert run_config["wandb"]["name"] == run

  # The CLI sees every run finished: nothing is trained again.
  env = dict(os.environ, WANDB_MODE="disabled")
  out = subprocess.run(
      [sys.executable, "-m", "research.sweep", "--config", experiment,
       "--workdir", workdir], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert [f"{r}: skipped" for r in RUNS] == out.stdout.splitlines()[:4]
  assert _summary_mtimes(workdir) == done

  # A changed config on the same sweep directory is refused, not mixed in.
  config.total_steps = 6
  with pytest.raises(sweep.SweepError, match="total_steps: 4 there, 6 now"):
    sweep.run_sweep(config, grid, workdir, train_fn=counting_train)

  # The table: numbers recomputed here from each run's own files.
  table = subprocess.run(
      [sys.executable, "-m", "research.results", "--workdir", workdir,
       "--csv", str(tmp_path / "table.csv")], cwd=REPO, capture_output=True,
      text=True, timeout=120, check=False)
  assert table.returncode == 0, table.stderr
  at_best = {}
  for run in RUNS:
    with open(os.path.join(workdir, run, "summary.json")) as f:
      best_step = json.load(f)["best_step"]
    with open(os.path.join(workdir, run, "metrics.jsonl")) as f:
      rows = [json.loads(l) for l in f]
    at_best[run] = [r for r in rows if r["step"] == best_step and
                    "eval/pearson" in r][-1]
  values = {m: {r: at_best[r][f"eval/{m}"] * 100 for r in RUNS}
            for m in ("pearson", "spearman")}
  assert len({round(v, 2) for v in values["pearson"].values()}) == 4
  best_run = max(RUNS, key=values["pearson"].get)
  seeds = {lr: [r for r in RUNS if r.startswith(f"lr={lr},")]
           for lr in ("0.003", "0.0001")}
  best_lr = max(seeds, key=lambda lr: np.mean(
      [values["pearson"][r] for r in seeds[lr]]))
  lines = table.stdout.splitlines()
  header = next(l for l in lines if l.startswith("| task"))
  assert header == (
      "| task | metric | runs | best run | best (dev) | best hyper-parameters "
      "| mean ± std (dev) | HF bert-base-cased (dev) | BERT-BASE paper (test) "
      "| BERT-LARGE paper (test) |")
  assert "**dev**" in table.stdout and "**test**" in table.stdout
  expected = []
  for metric, star in (("pearson", " \\*"), ("spearman", "")):
    group = [values[metric][r] for r in seeds[best_lr]]
    expected.append(
        f"| tiny_sweep | {metric}{star} | 4 | {best_run} "
        f"| {values[metric][best_run]:.2f} | lr={best_lr} "
        f"| {np.mean(group):.2f} ± {np.std(group, ddof=1):.2f} (n=2) "
        "| – | – | – |")
  assert [l for l in lines if l.startswith("| tiny_sweep |")] == expected
  with open(tmp_path / "table.csv") as f:
    header_csv = f.readline().strip().split(",")
  assert header_csv == list(results.COLUMNS)


def _result(path, task, metrics, lr, seed):
  return results.RunResult(
      path=path, task=task, group="", config={
          "optimizer.learning_rate": lr, "seed": seed, "wandb.name": path},
      metrics=metrics, selection=next(iter(metrics)), mode="max", step=10)


def test_table_groups_seeds_and_adds_the_published_references():
  runs = [
      _result("a", "mnli", {"matched/accuracy": 0.80,
                            "mismatched/accuracy": 0.81}, 2e-5, 0),
      _result("b", "mnli", {"matched/accuracy": 0.84,
                            "mismatched/accuracy": 0.83}, 2e-5, 1),
      _result("c", "mnli", {"matched/accuracy": 0.85,
                            "mismatched/accuracy": 0.80}, 5e-5, 0),
      _result("d", "mnli", {"matched/accuracy": 0.75,
                            "mismatched/accuracy": 0.76}, 5e-5, 1),
      _result("e", "sst2", {"accuracy": 0.92}, 3e-5, 0),
  ]
  rows = results.summarize(runs)
  assert [(r["task"], r["metric"]) for r in rows] == [
      ("sst2", "accuracy"), ("mnli", "matched/accuracy"),
      ("mnli", "mismatched/accuracy")]
  sst2, matched, mismatched = rows
  # Best single run: c (0.85); best mean over seeds: lr 2e-5 (0.82 vs 0.80).
  assert matched["best_run"] == mismatched["best_run"] == "c"
  assert matched["best"] == pytest.approx(85.0)
  assert mismatched["best"] == pytest.approx(80.0)
  assert matched["best_hparams"] == "lr=2e-05"
  assert matched["mean"] == pytest.approx(82.0)
  assert matched["std"] == pytest.approx(np.std([80, 84], ddof=1))
  assert mismatched["mean"] == pytest.approx(82.0)
  assert (matched["hf_dev_mean"], matched["hf_dev_std"]) == (83.80, 0.16)
  assert (matched["paper_test_base"], matched["paper_test_large"]) == (84.6,
                                                                       86.7)
  assert (mismatched["paper_test_base"], mismatched["hf_dev_pytorch"]) == (
      83.4, 84.10)
  assert sst2["std"] is None and sst2["n"] == 1
  text = results.markdown(rows, "x")
  assert ("| mnli | matched/accuracy \\* | 4 | c | 85.00 | lr=2e-05 "
          "| 82.00 ± 2.83 (n=2) | 83.80 ± 0.16 | 84.6 | 86.7 |") in text
  assert ("| sst2 | accuracy \\* | 1 | e | 92.00 | (one setting) "
          "| 92.00 (n=1) | 92.23 ± 0.57 | 93.5 | 94.9 |") in text


def test_references_hold_the_published_numbers():
  refs = glue.load_references()
  paper = refs["paper_test"]
  assert paper[("BERT-BASE", "cola", "matthews_corrcoef")] == 52.1
  assert paper[("BERT-LARGE", "qqp", "f1")] == 72.1
  assert paper[("BERT-BASE", "average", "glue_average")] == 79.6
  assert len([k for k in paper if k[0] == "BERT-LARGE"]) == 10  # 9 + average
  hf = refs["hf_dev"]
  assert hf[("stsb", "spearman")] == {"flax_best": 88.70, "flax_mean": 88.63,
                                      "flax_stdev": 0.07, "pytorch": 88.48}
  assert hf[("wnli", "accuracy")]["flax_mean"] == 37.01
  for name in (glue.PAPER_TEST_CSV, glue.HF_DEV_CSV):
    with open(os.path.join(glue.REFERENCES_DIR, name)) as f:
      text = f.read()
    assert ("TEST" in text) == (name == glue.PAPER_TEST_CSV)
    assert ("DEV" in text) == (name == glue.HF_DEV_CSV)
