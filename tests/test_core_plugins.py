"""Plug-ins defined outside research/: a task and a method in this file alone.

This module is itself a task module (`Task`: multi-label classification
with a sigmoid loss, and a model holding a non-Param nnx.Variable) and a
method module (`Method`: a loss wrapper adding an L2 penalty on the
classifier), plugged in by `config.task = __name__` and `config.methods =
(__name__,)` with no edit to `research/`. Also: BitFit (frozen weights
bit-identical, absent from optimiser state and checkpoints), the Poisson
sampler in a run, explicit `config.evals`, and the messages for bad names.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import quickstart
from research import export, methods, parallelism, restore, train
from research.configs import ConfigError, validate
from research.data.errors import DataError
from research.data.splits import TokenizedSplit, select
from research.models import hf
from research.tasks import common as task_common
from research.tasks import sequence_classification
from research.training import tracker
from tests.test_train import _restore_latest, _tiny_config

TOPICS = {"food": ["pizza", "bread", "soup", "cheese"],
          "sports": ["football", "tennis", "goal", "match"],
          "travel": ["train", "flight", "hotel", "beach"]}
FILLER = ["the", "was", "good", "today", "we", "had", "a", "great", "time"]


# --- A task defined here: multi-label classification -------------------------


class Task(sequence_classification.Task):
  """Labels "food|sports": multi-hot targets, a sigmoid loss per label.

  The model gets a non-Param variable (a fixed logit temperature of 0.5),
  which the trainable/frozen split must carry as a constant of the run.
  """

  def label_names(self, declared, train, evals):
    if not declared:
      raise DataError("multi-label: declare config.data.label_names")
    return tuple(declared)

  def check_labels(self, label_names):
    assert len(label_names) == self.config.num_labels

  def finish(self, name, enc, names, training):
    index = {n: i for i, n in enumerate(names)}
    hot = np.zeros((len(enc), len(names)), np.float32)
    for i, raw in enumerate(enc.labels):
      for label in raw.split("|"):
        if label not in index:
          raise DataError(f"{enc.where}, line {enc.rows[i]}: label "
                          f"{label!r} is not one of {list(names)}")
        hot[i, index[label]] = 1.0
    offsets, tokens, _, rows, _ = select(enc, np.ones(len(enc), bool))
    return TokenizedSplit.sequence(
        name=name, where=enc.where, input_ids=tokens["input_ids"],
        token_type_ids=tokens["token_type_ids"], offsets=offsets, labels=hot,
        rows=rows, max_length=self.config.data.max_length, has_labels=True,
        label_names=names), {}

  def load_model(self, model_dir, methods=()):
    model = super().load_model(model_dir, methods)
    model.temperature = nnx.Variable(jnp.asarray(0.5))
    return model

  def forward(self, model, batch, rngs=None):
    return super().forward(model, batch, rngs) / model.temperature[...]

  def loss(self, logits, batch):
    per_label = optax.sigmoid_binary_cross_entropy(logits, batch["labels"])
    return per_label.sum(axis=-1), batch["weights"]

  def predict(self, logits, batch):
    del batch
    return (logits > 0).astype(jnp.int32)  # [B, labels], multi-hot


# --- A method defined here: an L2 penalty on the classifier ------------------


class Method(methods.Method):
  """Adds weight * |classifier kernel|^2 to the loss."""
  CONFIG = {"weight": 1.0}

  def wrap_loss(self, loss_fn):
    def penalised(trainable, frozen, batch, key):
      loss, aux = loss_fn(trainable, frozen, batch, key)
      kernel = trainable["classifier"]["kernel"][...]
      return loss + self.options["weight"] * jnp.sum(jnp.square(kernel)), aux
    return penalised


def _multilabel_rows(n, seed):
  rng = np.random.default_rng(seed)
  lines = ["sentence\tlabels"]
  for _ in range(n):
    topics = sorted(rng.choice(sorted(TOPICS), rng.integers(1, 3),
                               replace=False))
    words = [str(rng.choice(TOPICS[t])) for t in topics for _ in range(2)]
    words += list(rng.choice(FILLER, rng.integers(2, 6)))
    rng.shuffle(words)
    lines.append(" ".join(words) + "\t" + "|".join(topics))
  return "\n".join(lines) + "\n"


def test_task_defined_in_a_test_file_trains_end_to_end(tmp_path,
                                                       tiny_model_dir):
  (tmp_path / "train.tsv").write_text(_multilabel_rows(320, 0))
  (tmp_path / "dev.tsv").write_text(_multilabel_rows(96, 1))
  config = _tiny_config(tiny_model_dir, total_steps=150, eval_every_steps=150,
                        log_every_steps=10, num_labels=3, task=__name__,
                        metrics=("accuracy", "f1"), **{
                            "data.train_file": str(tmp_path / "train.tsv"),
                            "data.eval_file": str(tmp_path / "dev.tsv"),
                            "data.label_field": "labels",
                            "data.label_names": tuple(sorted(TOPICS)),
                            "data.buckets": (32,),  # short rows, 150 steps
                            "model.hidden_dropout": 0.0,
                            "model.attention_dropout": 0.0,
                            "optimizer.learning_rate": 5e-3})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [r["train/loss"] for r in
            tracker.read_jsonl(tmp_path / "run" / "metrics.jsonl")
            if "train/loss" in r]
  assert losses[-1] < 0.25 * losses[0]
  # Per label bit: all-zero predictions score 1 - density (about 0.5).
  dev = [line.split("\t")[1] for line in
         (tmp_path / "dev.tsv").read_text().splitlines()[1:]]
  density = np.mean([len(d.split("|")) / 3 for d in dev])
  assert summary["eval/accuracy"] > max(density, 1 - density) + 0.3
  assert summary["eval/f1"] > 0.9
  # The non-Param variable is a constant of the run, not in the checkpoint.
  _, state, _ = _restore_latest(str(tmp_path / "run"))
  assert "temperature" not in state["params"]
  run = train.build(config)
  assert run.frozen[1]["temperature"][...] == 0.5


@pytest.mark.slow
def test_method_defined_in_a_test_file_wraps_the_loss(tmp_path, tiny_model_dir):
  overrides = {"total_steps": 20, "eval_every_steps": 20,
               "log_every_steps": 1, "optimizer.learning_rate": 3e-3}
  plain = _tiny_config(tiny_model_dir, **overrides)
  penalised = _tiny_config(tiny_model_dir, methods=(__name__,),
                           method_options={"test_core_plugins": {"weight": 3.0}},
                           **overrides)
  train.train_and_evaluate(plain, str(tmp_path / "plain"))
  train.train_and_evaluate(penalised, str(tmp_path / "penalised"))

  def first_loss(name):
    return tracker.read_jsonl(tmp_path / name / "metrics.jsonl")[0]["train/loss"]

  # Step 1: same parameters, batch and dropout, so the logged losses differ
  # by exactly the penalty of the initial classifier.
  model, _ = hf.load_pretrained(str(tiny_model_dir), "sequence_classification",
                                2, seed=plain.seed)
  kernel = np.asarray(model.classifier.kernel[...])
  assert first_loss("penalised") - first_loss("plain") == pytest.approx(
      3.0 * np.sum(kernel ** 2), rel=1e-4)
  norms = {name: np.linalg.norm(jax.tree.leaves(_restore_latest(
      str(tmp_path / name))[1]["params"]["classifier"]["kernel"])[0])
           for name in ("plain", "penalised")}
  assert norms["penalised"] < 0.4 * norms["plain"]  # measured: 0.27
  with pytest.raises(ConfigError, match=r"config.method_options."
                     r"test_core_plugins.wieght is not an option of method"):
    validate(_tiny_config(tiny_model_dir, methods=(__name__,), method_options={
        "test_core_plugins": {"wieght": 3.0}}))


def _is_trained(path):
  return path[-1] == "bias" or path[0] != "bert"


def test_bitfit_trains_biases_and_head_only(tmp_path, tiny_model_dir):
  config = _tiny_config(tiny_model_dir, total_steps=4, eval_every_steps=4,
                        methods=("bitfit",))
  # The run's own pieces: the frozen part is never updated nor donated.
  run = train.build(config)
  before = jax.device_get(run.frozen)
  trainable_paths = [p for p, _ in nnx.to_flat_state(run.state["params"])]
  assert trainable_paths and all(_is_trained(p) for p in trainable_paths)
  frozen_paths = [p for p, _ in nnx.to_flat_state(run.frozen[0])]
  assert any(p[-1] == "kernel" for p in frozen_paths)
  assert not any(_is_trained(p) for p in frozen_paths)
  state = run.state
  for step in range(4):
    batch = run.train_batches.batch_at(step)
    state, _ = run.train_step(state, run.frozen, parallelism.shard_batch(
        batch, run.batch_sharding), step)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(run.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Adam's moments exist for the trained weights only.
  moments = [p for p, _ in nnx.to_flat_state(state["opt_state"].mu)]
  assert sorted(moments) == sorted(trainable_paths)

  # Through train_and_evaluate: the checkpoint holds the trained part only.
  train.train_and_evaluate(config, str(tmp_path / "run"))
  _, saved, _ = _restore_latest(str(tmp_path / "run"))
  size = lambda tree: sum(np.asarray(x).size for x in jax.tree.leaves(tree))  # pylint: disable=unnecessary-lambda-assignment
  model, _ = hf.load_pretrained(str(tiny_model_dir), "sequence_classification",
                                2, seed=config.seed)
  total = size(nnx.state(model, nnx.Param))
  assert size(saved["params"]) == size(state["params"]) < 0.1 * total
  assert size(saved["opt_state"]) < 0.3 * total
  # Export merges the trained biases with the untouched frozen weights.
  out = export.export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
  exported, report = hf.load_pretrained(out, "sequence_classification", 2)
  assert report.missing == []
  original = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  changed = 0
  for path, value in nnx.to_flat_state(nnx.state(exported, nnx.Param)):
    a, b = np.asarray(value[...]), np.asarray(original[path][...])
    if _is_trained(path):
      changed += int((a != b).any())
    else:
      np.testing.assert_array_equal(a, b, err_msg=str(path))
  assert changed > 10


def test_poisson_sampler_trains_with_padded_variable_batches(tmp_path,
                                                             tiny_model_dir):
  config = _tiny_config(tiny_model_dir, total_steps=8, eval_every_steps=8,
                        log_every_steps=1, **{"data.sampler": "poisson"})
  run = train.build(config)
  batcher = run.train_batches
  assert batcher.batch_size == 32  # 16 + 4 sqrt(16), a multiple of 16
  sizes = [int(batcher.batch_at(s)["weights"].sum()) for s in range(40)]
  assert len(set(sizes)) > 3 and 8 < np.mean(sizes) < 24
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["final_step"] == 8 and np.isfinite(summary["eval/loss"])
  config.data.sampler_options = {"max_batch_sise": 20}
  with pytest.raises(ConfigError, match="max_batch_sise is not an option of "
                     "sampler 'poisson'; did you mean "
                     "config.data.sampler_options.max_batch_size"):
    validate(config)


def test_configured_evaluators_and_logits(tmp_path, tiny_model_dir):
  config = _tiny_config(tiny_model_dir, total_steps=4, eval_every_steps=4,
                        eval_metric="dev_f1/f1")
  config.evals = {"dev_f1": {"type": "sequence", "split": "validation",
                             "metrics": ("f1",)},
                  "dev_acc": {"type": "sequence", "split": "validation",
                              "metrics": ("accuracy",), "logits": True}}
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert {k for k in summary if k.startswith("eval/")} == {
      "eval/dev_f1/loss", "eval/dev_f1/f1", "eval/dev_acc/loss",
      "eval/dev_acc/accuracy"}
  assert "best/eval/dev_f1/f1" in summary
  restored = restore.restore_run(str(tmp_path / "run"))
  run = train.build(config)
  out = run.evaluators["dev_acc"].predict(restored.params, restored.frozen)
  assert out["logits"].shape == (100, 2)
  np.testing.assert_array_equal(out["logits"].argmax(-1), out["predictions"])
  accuracy = np.mean(out["predictions"] == run.eval_splits["validation"].labels)
  assert accuracy == pytest.approx(summary["eval/dev_acc/accuracy"])


@pytest.mark.parametrize("field,value,message", [
    ("task", "sequence_clasification", "config.task='sequence_clasification' "
     "is not a module of research/tasks/; did you mean "
     "'sequence_classification'? (valid: contrastive, masked_lm, prompt, question_answering, "
     "sequence_classification, token_classification"),
    ("methods", ("bitfitt",), "config.methods[0]='bitfitt' is not a module "
     "of research/methods/; did you mean 'bitfit'? (valid: adalora, adapters, "
     "augment, bitfit"),
    ("evals", {"dev": {"type": "sequnce", "split": "validation"}},
     "config.evals.dev.type='sequnce' is not a module of research/evaluators/"
     "; did you mean 'sequence'? (valid: embedding_probe, pre_training, robust, sequence, span, "
     "tagging, token"),
    ("evals", {"dev": {"type": "sequence", "split": "validation",
                       "metrix": ()}},
     "config.evals.dev.metrix is not an option of evaluator 'sequence'; did "
     "you mean config.evals.dev.metrics?"),
    ("data.sampler", "poison", "config.data.sampler='poison' is not a module "
     "of research/data/samplers/; did you mean 'poisson'? (valid: bucketed, "
     "poisson, sequential, shuffle"),
])
def test_bad_plugin_names_list_the_valid_modules(field, value, message):
  config = quickstart.get_config()
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError) as e:
    validate(config)
  assert message in str(e.value)


def test_cli_bad_task_is_one_line(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "research.train", "--config",
       "experiments/quickstart.py", "--config.task=ner",
       f"--workdir={tmp_path}"], cwd=repo, capture_output=True, text=True,
      env=dict(os.environ, WANDB_MODE="disabled"), timeout=300, check=False)
  assert out.returncode == 2
  assert "error: config.task='ner' is not a module of research/tasks/" in \
      out.stderr and "Traceback" not in out.stderr


class _TaskWithoutLoss(task_common.Task):
  """A task module's Task that forgot its loss and predictions."""

  def finish(self, name, enc, names, training):
    raise AssertionError("never reached: the task is refused at load")


def test_a_task_missing_its_loss_is_refused_by_name(monkeypatch):
  import types  # pylint: disable=import-outside-toplevel
  from research import tasks  # pylint: disable=import-outside-toplevel
  fake = types.ModuleType("my_tasks.incomplete")
  fake.Task = _TaskWithoutLoss
  monkeypatch.setitem(sys.modules, "my_tasks.incomplete", fake)
  config = quickstart.get_config()
  config.task = "my_tasks.incomplete"
  with pytest.raises(ConfigError, match=r"config.task='my_tasks.incomplete': "
                     r".*_TaskWithoutLoss does not define loss, predict"):
    tasks.load(config)
