"""Tiny trained runs of every task head, for the serving and export tests.

`make_runs(root, model_dir)` trains each task for a few steps on a small
synthetic set (the data of tests/test_tasks.py) with the 2-layer, 32-wide
`tiny_model_dir` model and returns {task: workdir}. A few steps are enough:
the tests compare the served answers with the run's own evaluators and the
ONNX export with the JAX model, not with the truth.
"""

import json
import os

from research import train
from research.configs import default

TASKS = ("sequence_classification", "token_classification",
         "question_answering", "masked_lm")

REVIEWS = [("a warm, funny and moving film", "positive"),
           ("the plot was dull and the acting was worse", "negative"),
           ("I loved every minute of it", "positive"),
           ("a complete waste of time and money", "negative"),
           ("great food and friendly staff", "positive"),
           ("the room was dirty and the staff were rude", "negative")]


def _jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _config(task, model_dir, train_file, **overrides):
  c = default.get_config()
  c.model.name = str(model_dir)
  c.task = task
  c.data.train_file = c.data.eval_file = train_file
  c.wandb.mode = "disabled"
  c.parallelism.mesh_shape = (1, 1, 1)
  c.batch_size = c.eval_batch_size = 8
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 5e-3, 0
  c.total_steps = 2
  c.eval_every_steps = 2
  c.log_every_steps = 1
  c.update_from_flattened_dict(overrides)
  return c


def configs(root, model_dir):
  """{task: config} of the tiny runs (data written under root)."""
  from tests.test_tasks import _ner_rows, _qa_rows  # pylint: disable=import-outside-toplevel
  os.makedirs(root, exist_ok=True)
  reviews = os.path.join(root, "reviews.tsv")
  with open(reviews, "w", encoding="utf-8") as f:
    f.write("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in REVIEWS * 4))
  ner = _jsonl(os.path.join(root, "ner.jsonl"), _ner_rows(32, 0))
  qa = _jsonl(os.path.join(root, "qa.jsonl"), _qa_rows(32, 0))
  texts = os.path.join(root, "texts.tsv")
  with open(texts, "w", encoding="utf-8") as f:
    f.write("sentence\n" + "".join(t + "\n" for t, _ in REVIEWS * 4))
  return {
      "sequence_classification": _config(
          "sequence_classification", model_dir, reviews, num_labels=2,
          **{"data.text_fields": ("sentence",), "data.label_field": "label",
             "data.label_names": ("negative", "positive"),
             "data.max_length": 32, "data.buckets": (16,),
             "metrics": ("accuracy",)}),
      "token_classification": _config(
          "token_classification", model_dir, ner, num_labels=4,
          **{"data.text_fields": ("tokens",), "data.label_field": "tags",
             "data.max_length": 32, "data.buckets": (16,),
             "metrics": ("accuracy", "entity_f1")}),
      "question_answering": _config(
          "question_answering", model_dir, qa,
          **{"data.text_fields": ("question", "context"),
             "data.label_field": "answers", "data.max_length": 32,
             "data.buckets": (), "metrics": ("exact_match", "f1"),
             "eval_metric": "f1", "task_options": {"doc_stride": 8}}),
      "masked_lm": _config(
          "masked_lm", model_dir, texts,
          **{"data.text_fields": ("sentence",), "data.max_length": 32,
             "data.buckets": (16,), "metrics": ("accuracy",)}),
  }


def make_runs(root, model_dir) -> dict:
  """Trains the tiny runs; returns {task: workdir}.

  XLA's optimisation passes are off while they train (quick compiles for
  two steps); serving compiles its own functions afterwards, as usual.
  """
  import jax  # pylint: disable=import-outside-toplevel
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    out = {}
    for task, config in configs(root, model_dir).items():
      workdir = os.path.join(root, task)
      train.train_and_evaluate(config, workdir)
      out[task] = workdir
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
  return out
