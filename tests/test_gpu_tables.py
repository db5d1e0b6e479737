"""benchmarks/gpu_tables.py: the plan, the learning-rate choice, the graft.

No training here (the queue's runs are ordinary `research.train` runs, tested
elsewhere): every planned command names a valid experiment config, the
sweep keeps the best seed-0 learning rate and adds seeds 1-2 (and TAPT after
full fine-tuning), and TAPT's exported model gets the base's pooler.
"""

import importlib
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
gpu_tables = importlib.import_module("gpu_tables")


def test_every_planned_command_is_a_valid_config():
  jobs = gpu_tables.plan("/tmp/w", {"peft", "dp", "robust", "scratch"}, False)
  assert len(jobs) == 108
  for config_arg in sorted({job.argv[4] for job in jobs}):
    module, _, arg = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(module))[0]
    config = importlib.import_module(f"experiments.{name}").get_config(arg)
    assert config.model.name == "all-minilm-l6-v2", config_arg


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


def test_graft_copies_the_base_pooler(tmp_path, tiny_model_dir):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from research.models import BertConfig, create_model, hf  # pylint: disable=import-outside-toplevel
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=128)
  mlm = hf.export(create_model("masked_lm", cfg, seed=1), tmp_path / "mlm",
                  "masked_lm")
  assert not any("pooler" in k for k in load_file(str(mlm / "model.safetensors")))
  gpu_tables.graft_pooler(str(mlm), base=str(tiny_model_dir))
  grafted = load_file(str(mlm / "model.safetensors"))
  base = load_file(str(tiny_model_dir / "model.safetensors"))
  prefix = "bert." if "bert.pooler.dense.weight" in base else ""
  np.testing.assert_array_equal(grafted["bert.pooler.dense.weight"],
                                base[prefix + "pooler.dense.weight"])
  model, report = hf.load_pretrained(str(mlm), "sequence_classification", 2)
  assert not any("pooler" in k for k in report.missing)
