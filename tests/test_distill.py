"""Knowledge distillation: research/methods/distill.py and methods/distillation/.

A tiny teacher (4 layers, 32 wide, its classifier scaled so that its
predictions are confident) teaches students made by
`distillation.student`: its layers 2 and 4 (same width), or a fresh,
narrower encoder (16 wide: the hidden term trains a projection). Checked:
the soft term at T = 1 is the cross-entropy against the teacher's
probabilities (T^2 scaling at T = 2, the hard term beside it, the cache the
same as the teacher on the fly, on sentences and on NER tokens); a student
made of teacher layers computes exactly what those layers computed; the
hidden and attention terms train, and the distilled student exports to a
directory `transformers` loads with logits within 1e-4, without loading the
teacher; a stopped run resumes to the same bits; augmented copies and
unlabelled text are taught by the teacher; bad settings name the option.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research import methods as methods_lib
from research import train
from research.configs import ConfigError
from research.export import export_run
from research.methods.distillation import losses, student
from research.methods.distillation import teacher as teacher_lib
from research.models import BertConfig, create_model, hf
from research.training import partition
from research.training.checkpointing import Checkpointer
from tests.test_reliability import _assert_trees_equal, _restore
from tests.test_reliability import compile_cache  # pylint: disable=unused-import
from tests.test_squad_conll_tasks import _conll_file
from tests.test_tasks import _ner_rows
from tests.test_train import _metrics, _tiny_config

TEACHER = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=128)
NO_DROPOUT = {"model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}


def _teacher(out, head, num_labels, minilm_dir):
  model = create_model(head, TEACHER, num_labels, seed=7)
  model.classifier.kernel[...] = model.classifier.kernel[...] * 40.0
  hf.export(model, out, head, tokenizer_dir=minilm_dir)
  return str(out)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, minilm_dir):
  return _teacher(tmp_path_factory.mktemp("teacher"),
                  "sequence_classification", 2, minilm_dir)


@pytest.fixture(scope="module")
def layers_dir(tmp_path_factory, teacher_dir):
  """Teacher layers 2 and 4 (every other one), same width."""
  out, layers = student.from_layers(teacher_dir,
                                    tmp_path_factory.mktemp("layers"))
  assert layers == (2, 4)
  return str(out)


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory, teacher_dir):
  """A fresh 2-layer student, 16 wide (the teacher: 32), 4 heads."""
  return str(student.fresh(teacher_dir, tmp_path_factory.mktemp("narrow"), {
      "hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": 32}))


def _config(model_dir, teacher, overrides=None, methods=("distill",),
            **options):
  config = _tiny_config(model_dir, **{
      "total_steps": 8, "log_every_steps": 1, "eval_every_steps": 8,
      "data.max_length": 32, "data.buckets": (32,), **(overrides or {})})
  config.methods = methods
  config.method_options = {"distill": methods_lib.with_defaults(
      "distill", teacher=teacher, **options)}
  return config


def _loss(run, batch, seed=0):
  """The run's training loss (the methods' wrap of the task's) on `batch`."""
  loss_fn = methods_lib.wrap_loss(run.methods, run.task.loss_fn(run.graphdef))
  return float(loss_fn(run.state["params"], run.frozen, batch,
                       jax.random.key(seed))[0])


def _logits(model, task, batch):
  return np.asarray(task.forward(model, batch), np.float64)


def _ce(student_logits, targets, weights):
  """Weighted mean of -sum targets log softmax(student): numpy, float64."""
  s = student_logits - student_logits.max(-1, keepdims=True)
  log_p = s - np.log(np.exp(s).sum(-1, keepdims=True))
  per = -(targets * log_p).sum(-1)
  return float((per * weights).sum() / weights.sum())


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# --- The soft term -------------------------------------------------------------


def test_soft_cross_entropy_unit():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) * 3
  w = np.array([1, 1, 0, 1, 0.5])
  got = float(losses.soft_cross_entropy(jnp.asarray(s), jnp.asarray(t),
                                        jnp.asarray(w), 1.0))
  assert got == pytest.approx(float(
      (optax.softmax_cross_entropy(s, _softmax(t)) * w).sum() / w.sum()),
      rel=1e-6)
  # T^2 x CE at temperature T; a regression output: squared difference.
  got = float(losses.soft_cross_entropy(jnp.asarray(s), jnp.asarray(t),
                                        jnp.asarray(w), 3.0))
  assert got == pytest.approx(9 * _ce(s / 3, _softmax(t / 3), w), rel=1e-5)
  got = float(losses.soft_cross_entropy(jnp.asarray(s[:, :1]),
                                        jnp.asarray(t[:, :1]),
                                        jnp.asarray(w), 3.0))
  assert got == pytest.approx(float(((s[:, 0] - t[:, 0]) ** 2 * w).sum()
                                    / w.sum()), rel=1e-5)


@pytest.mark.parametrize("temperature,hard,mode", [
    (1.0, 0.0, "fly"), (2.0, 0.5, "fly"), (1.0, 0.0, "cache")])
def test_soft_targets_equal_cross_entropy_against_the_teacher(
    layers_dir, teacher_dir, temperature, hard, mode):
  """T = 1, soft weight 1, hard 0: the loss is the cross-entropy against the
  teacher's probabilities; at T the soft term is T^2 x CE at T, and the hard
  term adds the task's loss; the cache gives the teacher's outputs."""
  run = train.build(_config(layers_dir, teacher_dir, NO_DROPOUT,
                            temperature=temperature, hard=hard,
                            teacher_logits=mode))
  teacher, _ = hf.load_pretrained(teacher_dir, run.task.HEAD, 2)
  student_model = partition.merge(run.graphdef, run.state["params"],
                                  run.frozen)
  for step in (0, 1):
    batch = run.train_batches.batch_at(step)
    s = _logits(student_model, run.task, batch)
    t = _logits(teacher, run.task, batch)
    w = batch["weights"]
    expected = temperature ** 2 * _ce(s / temperature,
                                      _softmax(t / temperature), w)
    expected += hard * _ce(s, np.eye(2)[batch["labels"]], w)
    assert _loss(run, batch) == pytest.approx(expected, rel=1e-5)


def test_token_classification_distils_every_token(tmp_path, tiny_model_dir,
                                                  minilm_dir):
  """NER: one distribution per real token; the cache equals the teacher."""
  train_file = _conll_file(tmp_path / "train.txt", _ner_rows(48, 0))
  tags = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
  teacher = _teacher(tmp_path / "teacher", "token_classification", 5,
                     minilm_dir)
  overrides = {**NO_DROPOUT, "task": "token_classification",
               "num_labels": 5, "data.train_file": train_file,
               "data.eval_file": train_file, "data.text_fields": ("tokens",),
               "data.label_names": tags, "metrics": ("accuracy",),
               "eval_metric": "accuracy", "data.buckets": (16, 32)}
  losses_by_mode = {}
  for mode in ("fly", "cache"):
    run = train.build(_config(tiny_model_dir, teacher, overrides,
                              teacher_logits=mode))
    batch = run.train_batches.batch_at(0)
    losses_by_mode[mode] = _loss(run, batch)
  t_model, _ = hf.load_pretrained(teacher, run.task.HEAD, 5)
  s_model = partition.merge(run.graphdef, run.state["params"], run.frozen)
  s, t = _logits(s_model, run.task, batch), _logits(t_model, run.task, batch)
  w = batch["weights"][:, None] * batch["attention_mask"]
  expected = _ce(s.reshape(-1, 5), _softmax(t).reshape(-1, 5), w.reshape(-1))
  assert losses_by_mode["fly"] == pytest.approx(expected, rel=1e-5)
  assert losses_by_mode["cache"] == pytest.approx(expected, rel=1e-5)


# --- The student's initial checkpoint ----------------------------------------------


def test_student_from_teacher_layers_reproduces_those_layers(
    teacher_dir, layers_dir, tmp_path):
  assert student.every_other(6) == (2, 4, 6)
  assert student.every_other(5) == (1, 3, 5)
  teacher, _ = hf.load_pretrained(teacher_dir, "sequence_classification", 2)
  pupil, report = hf.load_pretrained(layers_dir, "sequence_classification", 2)
  assert not report.missing and pupil.cfg.num_hidden_layers == 2
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 2000, (3, 12)), jnp.int32)
  mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [7], [3]]),
                     jnp.int32)

  def states(model):
    _, sown = nnx.capture(lambda m: m(ids, mask), nnx.Intermediate,
                          method_outputs=nnx.Intermediate)(model)
    return [np.asarray(h) for h in losses.hidden_states(sown)]

  t, s = states(teacher), states(pupil)
  np.testing.assert_array_equal(s[0], t[0])  # the embeddings
  # Student layer k, on the input teacher layer 2k read, computes exactly
  # what teacher layer 2k computed.
  attend = mask.astype(bool)[:, None, None, :]
  for k, layer in enumerate(pupil.bert.layers):
    np.testing.assert_array_equal(
        np.asarray(layer(jnp.asarray(t[2 * k + 1]), attend)), t[2 * k + 2])
  # The head comes along.
  for get in (lambda m: m.classifier.kernel, lambda m: m.bert.pooler.kernel):
    np.testing.assert_array_equal(get(pupil)[...], get(teacher)[...])
  # The bottom layers of a teacher: the same hidden states, all of them.
  out, _ = student.from_layers(teacher_dir, tmp_path / "bottom", (1, 2))
  bottom, _ = hf.load_pretrained(str(out), "sequence_classification", 2)
  for a, b in zip(states(bottom), t[:3]):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="increasing teacher layers in 1..4"):
    student.from_layers(teacher_dir, tmp_path / "bad", (3, 2))


def test_fresh_student_has_the_shape_asked(narrow_dir):
  cfg = hf.read_config(narrow_dir)
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (16, 2,
                                                                       30522)
  _, report = hf.load_pretrained(narrow_dir, "sequence_classification", 2)
  assert [k for k in report.missing if k.startswith("bert.")] == []
