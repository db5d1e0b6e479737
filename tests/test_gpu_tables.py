"""benchmarks/gpu_tables.py: the plan and the learning-rate choice.

No training here (the queue's runs are ordinary `research.train` runs, tested
elsewhere): every planned command names a valid experiment config, and the
sweep keeps the best seed-0 learning rate and adds seeds 1-2 (and TAPT after
full fine-tuning). The robust queue's config, experiments/robust.py, names a
bad argument.
"""

import importlib
import json
import os
import re
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
gpu_tables = importlib.import_module("gpu_tables")


def test_every_planned_command_is_a_valid_config():
  jobs = gpu_tables.plan("/tmp/w", {"peft", "dp", "robust", "scratch"}, False)
  assert len(jobs) == 130
  configs = {}
  for config_arg in sorted({job.argv[4] for job in jobs}):
    module, _, arg = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(module))[0]
    config = importlib.import_module(f"experiments.{name}").get_config(arg)
    assert config.model.name == "all-minilm-l6-v2", config_arg
    configs[config_arg] = config
  # The small-ball rows reach the method (GLUE only: 2 tasks x 3 x 3 seeds).
  small = [job for job in jobs if "_eps0.03/" in job.name]
  assert len(small) == 18 and all(job.row["eps"] == 0.03 for job in small)
  config = configs[
      "experiments/robust.py:data=cola,method=pgd,seed=1,eps=0.03"]
  assert config.method_options.pgd.epsilon == 0.03
  assert abs(config.method_options.pgd.step_size - 0.015) < 1e-12
  # FreeLB's initial noise shrinks with its ball (0.1 of 0.3 -> 0.01 of 0.03).
  freelb = configs[
      "experiments/robust.py:data=rte,method=freelb,seed=2,eps=0.03"]
  assert abs(freelb.method_options.freelb.epsilon - 0.03) < 1e-12
  assert abs(freelb.method_options.freelb.step_size - 0.01) < 1e-12
  assert abs(freelb.method_options.freelb.init_magnitude - 0.01) < 1e-12
  assert freelb.method_options.freelb.steps == 2


@pytest.mark.parametrize("arg, named", [
    ("method=plain,eps=0.03", "method='plain', which has no training ball"),
    ("method=augment,eps=0.03", "valid: fgm, pgd, freelb, smart"),
    ("method=fgm,eps=small", "eps= a number"),
    ("seed=one", "seed= takes an integer"),
    ("method=adv", "valid: plain, fgm"),
])
def test_robust_config_names_a_bad_argument(arg, named):
  robust = importlib.import_module("experiments.robust")
  with pytest.raises(ValueError, match=re.escape(named)):
    robust.get_config(arg)


class _Queue:
  def __init__(self):
    self.done = {}


def _record(job, value, metric="matthews_corrcoef"):
  return {"name": job.name, "status": "ok", "row": job.row,
          "summary": {f"eval/{metric}": value}}


def test_the_best_seed_0_learning_rate_gets_the_other_seeds_and_tapt():
  queue = _Queue()
  jobs = gpu_tables.peft_jobs("/tmp/w", "cola", "full", {})
  assert [j.row["lr"] for j in jobs] == list(gpu_tables.LR_GRID["full"])
  follow = ()
  for job, value in zip(jobs, (0.19, 0.26, 0.22)):
    queue.done[job.name] = _record(job, value)
    follow = job.then(queue.done[job.name], queue)
    if job is not jobs[-1]:
      assert not follow  # waits for the whole grid
  names = [j.name for j in follow]
  assert names[:2] == ["peft/cola/full/lr5e-05/s1", "peft/cola/full/lr5e-05/s2"]
  assert names[2] == "tapt/cola/pretrain"
  # A grid whose runs all failed adds nothing.
  queue = _Queue()
  jobs = gpu_tables.peft_jobs("/tmp/w", "rte", "lora", {})
  for job in jobs:
    queue.done[job.name] = {"name": job.name, "status": "rc=1", "row": job.row}
  assert not jobs[-1].then(queue.done[jobs[-1].name], queue)


def test_the_dp_learning_rate_is_chosen_at_epsilon_8_then_every_epsilon_runs(
    monkeypatch):
  monkeypatch.setattr(gpu_tables, "DP_CHUNK", 32)
  queue = _Queue()
  jobs = gpu_tables.dp_lr_jobs("/tmp/w", "cola", "full")
  assert [(j.row["lr"], j.row["epsilon"], j.row["seed"]) for j in jobs] == [
      (lr, 8.0, 0) for lr in gpu_tables.DP_LR_GRID]
  assert "--config.privacy.chunk_size=32" in jobs[0].argv
  follow = ()
  for job, value in zip(jobs, (0.0, 0.12, 0.05)):
    queue.done[job.name] = _record(job, value)
    follow = job.then(queue.done[job.name], queue)
    if job is not jobs[-1]:
      assert not follow
  best = gpu_tables.DP_LR_GRID[1]
  assert sorted((j.row["epsilon"], j.row["seed"]) for j in follow) == sorted(
      (eps, seed) for eps in (8.0, 3.0, 1.0) for seed in (0, 1, 2)
      if (eps, seed) != (8.0, 0))
  assert all(j.row["lr"] == best and
             f"--config.optimizer.learning_rate={best:g}" in j.argv
             for j in follow)
  # The non-private baseline keeps its own recipe and chunking is DP's.
  plain = gpu_tables._dp("/tmp/w", "cola", "full", 0.0, 1)
  assert not [a for a in plain.argv if a.startswith("--config.")]


def _write_summary_job(workdir, value):
  job = gpu_tables.Job("t", "robust", "", str(workdir))
  job.argv = [sys.executable, "-c", "import json, sys; json.dump({'v': "
              f"{value}}}, open(sys.argv[1] + '/summary.json', 'w'))",
              str(workdir)]
  return job


def _run(out, job):
  queue = gpu_tables.Queue(str(out), 1, 60, [])
  queue.add(job)
  queue.run()
  return queue.done["t"]["summary"]


def test_a_finished_run_is_reused_only_for_the_same_command_and_configs(
    tmp_path, monkeypatch):
  work = tmp_path / "w"
  work.mkdir()
  (work / "summary.json").write_text(json.dumps({"v": 0}))  # unstamped
  assert _run(tmp_path, _write_summary_job(work, 1)) == {"v": 1}
  stale = list(tmp_path.glob("w.stale-*"))
  assert [json.loads((d / "summary.json").read_text()) for d in stale] == [
      {"v": 0}]
  # The same command and configs: the finished run is read back, not rerun.
  (work / "summary.json").write_text(json.dumps({"v": 5}))
  assert _run(tmp_path, _write_summary_job(work, 1)) == {"v": 5}
  # Another command in the same folder: moved aside, run afresh.
  assert _run(tmp_path, _write_summary_job(work, 2)) == {"v": 2}
  # The same command after a config module changed: run again.
  (work / "summary.json").write_text(json.dumps({"v": 7}))
  monkeypatch.setattr(gpu_tables, "config_digest", lambda: "edited")
  assert _run(tmp_path, _write_summary_job(work, 2)) == {"v": 2}
  assert len(list(tmp_path.glob("w.stale-*"))) == 3
