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
  jobs = gpu_tables.plan("/tmp/w", {"peft", "dp", "robust", "conll", "squad",
                                    "scratch"}, False)
  names = [job.name for job in jobs]
  assert len(names) == len(set(names))
  configs = {}
  for config_arg in sorted({job.argv[4] for job in jobs
                            if job.argv[2] == "research.train"}):
    module, _, arg = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(module))[0]
    config = importlib.import_module(f"experiments.{name}").get_config(arg)
    assert config.model.name == "all-minilm-l6-v2", config_arg
    # The checkpoint's own pooling (mean for MiniLM) in every table.
    assert config.model.pooling == "auto", config_arg
    configs[config_arg] = config
  # PEFT: 7 methods x 3 tasks, each learning-rate grid at seed 0.
  peft = [j for j in jobs if j.group == "peft"]
  assert {(j.row["task"], j.row["method"]) for j in peft} == {
      (t, m) for t in ("quickstart", "rte", "cola")
      for m in ("full", "lora", "adalora", "houlsby", "pfeiffer", "prefix",
                "bitfit")}
  assert len(peft) == 3 * sum(map(len, gpu_tables.LR_GRID.values()))
  # Robust: a ball grid at seed 0 for the methods with a ball (GLUE).
  ball = [j for j in jobs if j.group == "robust" and j.row["eps"]]
  assert len(ball) == 2 * sum(map(len, gpu_tables.ROBUST_EPS_GRID.values()))
  config = configs[
      "experiments/robust.py:data=cola,method=pgd,seed=0,eps=0.03,"
      f"data_dir={gpu_tables.SHARED}/glue_cola"]
  assert config.method_options.pgd.epsilon == 0.03
  assert abs(config.method_options.pgd.step_size - 0.015) < 1e-12
  # FreeLB's initial noise shrinks with its ball (0.1 of 0.3 -> 0.01 of 0.03).
  freelb = configs[
      "experiments/robust.py:data=rte,method=freelb,seed=0,eps=0.03,"
      f"data_dir={gpu_tables.SHARED}/glue_rte"]
  assert abs(freelb.method_options.freelb.epsilon - 0.03) < 1e-12
  assert abs(freelb.method_options.freelb.step_size - 0.01) < 1e-12
  assert abs(freelb.method_options.freelb.init_magnitude - 0.01) < 1e-12
  # DP on MR (the SentEval folder) and CoLA.
  mr = configs["experiments/dp_sgd.py:data=mr,epsilon=8,seed=0,method=full,"
               f"data_dir={gpu_tables.SHARED}/senteval_mr"]
  assert mr.data.train_file.endswith("senteval_mr/train.tsv")
  assert mr.method_options.dp_sgd.target_epsilon == 8.0
  # CoNLL's 3 epochs and SQuAD's split step, then its training.
  conll = [j for j in jobs if j.group == "conll"]
  assert len(conll) == 3 and "--config.num_epochs=3" in conll[0].argv
  prepare = next(j for j in jobs if j.name == "squad/prepare")
  assert prepare.argv[-3:] == ["--dev_articles", "5,8", "--answerable_only"]
  train = prepare.then({"status": "ok"}, None)
  assert [j.name for j in train] == ["squad/s0", "squad/s1", "squad/s2"]
  module, _, arg = train[0].argv[4].partition(":")
  squad = importlib.import_module("experiments.squad_v1").get_config(arg)
  assert squad.data.train_file.endswith("v1.1-train.json")


@pytest.mark.parametrize("arg, named", [
    ("method=plain,eps=0.03", "method='plain', which has no training ball"),
    ("method=augment,eps=0.03", "valid: fgm, pgd, freelb, smart"),
    ("method=fgm,eps=small", "eps='small': expected a value of type float"),
    ("seed=one", "seed='one': expected a value of type int"),
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
  for job, value in zip(jobs, (0.19, 0.26, 0.22, 0.20)):
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
  assert "--config.method_options.dp_sgd.chunk_size=32" in jobs[0].argv
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
  # CoLA's diagnostics at the chosen rate: automatic clipping, and clipping
  # without noise.
  jobs = gpu_tables.dp_lr_jobs("/tmp/w", "cola", "full", diagnostics=True)
  queue = _Queue()
  for job, value in zip(jobs, (0.0, 0.12, 0.05)):
    queue.done[job.name] = _record(job, value)
  follow = jobs[-1].then(None, queue)
  variants = {j.row["variant"]: j for j in follow if j.row["variant"]}
  assert set(variants) == {"automatic", "clip_only"}
  assert ("--config.method_options.dp_sgd.clipping=automatic"
          in variants["automatic"].argv)
  assert {"--config.method_options.dp_sgd.noise_multiplier=0.0",
          "--config.method_options.dp_sgd.target_epsilon=-1.0"} <= set(
              variants["clip_only"].argv)
  config = importlib.import_module("experiments.dp_sgd").get_config(
      variants["clip_only"].argv[4].partition(":")[2])
  # The fields the flags override exist (methods.with_defaults).
  assert {"noise_multiplier", "target_epsilon", "clipping"} <= set(
      config.method_options.dp_sgd)


def test_the_best_ball_gets_the_other_seeds():
  jobs = gpu_tables.robust_jobs("/tmp/w", "rte", "fgm")
  assert [j.row["eps"] for j in jobs] == list(gpu_tables.ROBUST_EPS_GRID["fgm"])
  queue = _Queue()
  for job, value in zip(jobs, (0.527, 0.58, 0.56)):
    queue.done[job.name] = _record(job, value, "accuracy")
  assert [j.name for j in jobs[-1].then(None, queue)] == [
      "robust/rte/fgm/eps0.03/s1", "robust/rte/fgm/eps0.03/s2"]
  assert len(gpu_tables.robust_jobs("/tmp/w", "rte", "plain")) == 3


def test_smoke_selects_one_run_per_group(capsys):
  """--smoke --dry_run: the first job of every group, two steps each."""
  assert gpu_tables.main(["--out", "/tmp/gt_dry", "--smoke", "--dry_run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines[:-1]] == list(
      gpu_tables.SMOKE_JOBS)
  train = [line for line in lines if "research.train" in line]
  assert train and all("--config.total_steps=2" in line for line in train)


def test_smoke_runs_a_job_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
  """--smoke for real: one 2-step run of the tiny model through the queue
  (one seed, so no follow-ups: those are tested above), then the tables."""
  monkeypatch.setattr(gpu_tables, "SEEDS", (0,))
  rc = gpu_tables.main([
      "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
      "--smoke", "--groups", "peft", "--only", "quickstart/full",
      "--workers", "1", "--budget_s", "900",
      "--extra", f"--config.model.name={tiny_model_dir} "
      "--config.cpu_malloc=default --config.data.buckets=(64,)"])
  assert rc == 0
  with open(tmp_path / "out" / "results.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["name"] for r in records] == ["peft/quickstart/full/lr2e-05/s0"]
  assert records[0]["status"] == "ok"
  assert records[0]["summary"]["final_step"] == 2
  tables = (tmp_path / "out" / "tables.md").read_text()
  assert "| peft | quickstart | full | 2e-05 |" in tables


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
