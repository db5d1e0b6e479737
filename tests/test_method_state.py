"""A method that owns a model: a frozen teacher, loaded once from the run context.

This module is itself a method module (`Method`, plugged in by
`config.methods = (__name__,)`): knowledge distillation in its simplest
form, the student's loss plus `weight` times the cross-entropy between the
teacher's and the student's softened class distributions. The teacher is a
second model, loaded once in `Method.setup` from the run's context; its
weights travel in `frozen.methods`, beside the frozen part of the student:
sharded by the mesh, never donated, never checkpointed. Tests: it trains on
two simulated devices, pulls the student towards the teacher, is read from
disk once per run, is not in any checkpoint, and a stopped run resumes to
the same bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research import methods, train
from research.models import BertConfig, create_model, hf
from research.training import partition
from research.training.checkpointing import Checkpointer
from tests.test_reliability import _assert_trees_equal, _restore
from tests.test_train import _metrics, _tiny_config


class Method(methods.Method):
  """Distillation from a frozen teacher checkpoint (`teacher`: its directory)."""
  CONFIG = {"teacher": "", "weight": 1.0, "temperature": 2.0}
  loads = []  # every teacher load: (path, training)

  def setup(self, context):
    if not context.training:
      return None  # export and prediction do not need the teacher
    Method.loads.append(self.options["teacher"])
    teacher, _ = hf.load_pretrained(
        self.options["teacher"], context.task.HEAD,
        context.task.num_outputs(), dtype=context.config.model.dtype)
    self.task = context.task
    self.teacher_graphdef, state = nnx.split(teacher)
    return state  # the run places it beside the frozen weights

  def wrap_loss(self, loss_fn):
    weight, t = self.options["weight"], self.options["temperature"]

    def distilled(trainable, frozen, batch, key):
      loss, aux = loss_fn(trainable, frozen, batch, key)
      teacher = nnx.merge(self.teacher_graphdef, frozen.methods[self.name])
      targets = jax.nn.softmax(jax.lax.stop_gradient(
          self.task.forward(teacher, batch)) / t)
      soft = optax.softmax_cross_entropy(aux["outputs"] / t, targets)
      w = batch["weights"]
      return loss + weight * jnp.sum(soft * w) / jnp.maximum(w.sum(), 1.0), aux

    return distilled


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, minilm_dir):
  """A confident teacher: the tiny student's shape, another random start,
  its classifier scaled so that its predictions are far from uniform."""
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=128)
  model = create_model("sequence_classification", cfg, 2, seed=7)
  model.classifier.kernel[...] = model.classifier.kernel[...] * 40.0
  out = tmp_path_factory.mktemp("teacher")
  hf.export(model, out, "sequence_classification", tokenizer_dir=minilm_dir)
  return str(out)


def _config(model_dir, teacher, **overrides):
  config = _tiny_config(model_dir, **{
      "total_steps": 8, "log_every_steps": 1, "eval_every_steps": 4,
      "data.max_length": 32, "data.buckets": (32,), **overrides})
  config.parallelism.mesh_shape = (2, 1, 1)  # two simulated devices
  config.methods = (__name__,)
  config.method_options = {"test_method_state": {"teacher": teacher,
                                                 "weight": 5.0}}
  return config


def _agreement(run, params):
  """Share of dev sentences where the student predicts the teacher's label."""
  teacher = nnx.merge(run.methods[0].teacher_graphdef,
                      run.frozen.methods["test_method_state"])
  student = partition.merge(run.graphdef, params, run.frozen)
  same = total = 0
  for step in range(run.eval_batches["validation"].steps_per_epoch):
    batch = run.eval_batches["validation"].batch_at(step)
    real = batch["weights"] > 0
    a = np.asarray(run.task.forward(teacher, batch)).argmax(-1)
    b = np.asarray(run.task.forward(student, batch)).argmax(-1)
    same += int((a == b)[real].sum())
    total += int(real.sum())
  return same / total


def test_a_method_owns_a_teacher_loaded_once_and_never_saved(
    tmp_path, tiny_model_dir, teacher_dir, monkeypatch):
  reads = []
  read_weights = hf.read_weights
  monkeypatch.setattr(hf, "read_weights", lambda path: (
      reads.append(str(path)), read_weights(path))[1])
  Method.loads.clear()
  config = _config(tiny_model_dir, teacher_dir, total_steps=40,
                   eval_every_steps=40)
  run = train.build(config)
  # One instance, set up once; its state sharded over the two devices'
  # mesh beside the frozen weights, not in the donated state.
  assert len(run.methods) == 1 and Method.loads == [teacher_dir]
  teacher_state = run.frozen.methods["test_method_state"]
  leaf = jax.tree.leaves(teacher_state)[0]
  assert leaf.sharding.mesh.shape["data"] == 2
  before = _agreement(run, run.state["params"])

  reads.clear()
  Method.loads.clear()
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  # Read from disk once for the whole run: one load, one read of its file.
  assert Method.loads == [teacher_dir]
  assert sum(teacher_dir in r for r in reads) == 1, reads
  assert summary["final_step"] == 40
  # The checkpoint holds the student's trained part and optimiser state
  # only: nothing of the teacher.
  _, saved, _ = _restore(str(tmp_path / "run"))
  size = lambda tree: sum(np.asarray(x).size for x in jax.tree.leaves(tree))  # pylint: disable=unnecessary-lambda-assignment
  assert size(saved["params"]) == size(run.state["params"])
  assert set(saved) == {"params", "opt_state"}
  # The loss pulled the student towards the teacher's labels.
  with Checkpointer(str(tmp_path / "run")) as ckpt:
    _, state, _ = ckpt.restore(
        {"params": jax.tree.map(np.asarray, run.state["params"])},
        partial=True)
  after = _agreement(run, state["params"])
  assert after > max(before + 0.2, 0.9), (before, after)


def test_a_stopped_distillation_resumes_to_the_same_bits(
    tmp_path, tiny_model_dir, teacher_dir, monkeypatch):
  config = _config(tiny_model_dir, teacher_dir)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)
  # Stop at step 4 through the preemption path (what SIGTERM triggers).
  real = Checkpointer.reached_preemption
  monkeypatch.setattr(Checkpointer, "reached_preemption",
                      lambda self, step: step == 4 or real(self, step))
  with pytest.raises(train.Preempted, match="saved step 4"):
    train.train_and_evaluate(config, resumed)
  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  train.train_and_evaluate(config, resumed)
  step_a, state_a, extras_a = _restore(straight)
  step_b, state_b, extras_b = _restore(resumed)
  assert step_a == step_b == 8 and extras_a == extras_b
  _assert_trees_equal(state_a, state_b)
  assert _metrics(straight) == _metrics(resumed)
