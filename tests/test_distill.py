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


# --- Hidden states, attention, export ------------------------------------------------


def test_hidden_and_attention_terms_train_and_export_drops_the_projection(
    tmp_path, narrow_dir, teacher_dir, monkeypatch):
  """A 16-wide student learns the 32-wide teacher's hidden states (through
  the trained projection) and attention; the export is a plain BERT that
  transformers reads with the same logits, made without the teacher."""
  from transformers import BertForSequenceClassification  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from research import restore  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  config = _config(narrow_dir, teacher_dir, {
      "total_steps": 40, "eval_every_steps": 40,
      "optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 0},
                   soft=0.0, hidden=1.0, attention=1.0,
                   attention_layers="all")
  summary = train.train_and_evaluate(config, workdir)
  losses_logged = [r["train/loss"] for r in _metrics(workdir)
                   if "train/loss" in r]
  # Measured when written: 1.00 -> 0.57.
  assert losses_logged[-1] < 0.7 * losses_logged[0], losses_logged
  # The projection (W_h and W_e: 16 -> 32) trained and is checkpointed.
  _, saved, _ = _restore(workdir)
  flat = dict(nnx.to_flat_state(nnx.State(saved["params"])))
  projection = [p for p in flat if "distill_projection" in p]
  assert len(projection) == 4, projection
  assert summary["params/trainable"] == summary["params/total"]

  loads = []
  monkeypatch.setattr(teacher_lib, "load",
                      lambda *a, **k: loads.append(a) or 1 / 0)
  out = export_run(workdir, str(tmp_path / "hf"))
  assert loads == []  # export never loads the teacher
  weights, _ = hf.read_weights(out)
  assert not [k for k in weights if "distill" in k]
  restored = restore.restore_run(workdir)
  sentences = ["a gripping, funny film", "dull and far too long",
               "i would not watch it again"]
  enc = restored.tokenizer(sentences, padding=True, return_tensors="np")
  ours = np.asarray(restored.model(
      jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
      jnp.asarray(enc["token_type_ids"])))
  theirs = BertForSequenceClassification.from_pretrained(out).eval()
  with torch.no_grad():
    logits = theirs(**{k: torch.tensor(v) for k, v in enc.items()}).logits
  np.testing.assert_allclose(logits.numpy(), ours, atol=1e-4)
  assert np.abs(ours).max() > 1e-3  # not a trivially zero comparison


@pytest.mark.parametrize("student_fixture,mesh,options", [
    ("narrow_dir", (1, 1, 1), {"hidden": 1.0, "attention": 1.0, "hard": 0.5}),
    ("layers_dir", (2, 1, 1), {"teacher_logits": "cache",
                               "temperature": 2.0})],
                         ids=["fly-hidden-attention", "cache-2-devices"])
def test_a_stopped_distillation_resumes_to_the_same_bits(
    request, tmp_path, teacher_dir, student_fixture, mesh, options,
    monkeypatch):
  config = _config(request.getfixturevalue(student_fixture), teacher_dir,
                   {"parallelism.mesh_shape": mesh}, **options)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)
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


# --- Transfer data: augmented copies, unlabelled text ------------------------------


def test_augmented_copies_are_taught_by_the_teacher(layers_dir, teacher_dir):
  """TinyBERT's augmentation: the augment method's copies in the training
  set, each with the teacher's targets (on the fly, or cached when the
  copies are made once)."""
  config = _config(layers_dir, teacher_dir, NO_DROPOUT,
                   methods=("augment", "distill"))
  config.method_options.augment = methods_lib.with_defaults(
      "augment", copies=1, rate=0.3)
  run = train.build(config)
  split, n = run.train_split, 320
  assert len(split) == 2 * n
  differ = sum(not np.array_equal(
      split.input_ids[split.offsets[i]:split.offsets[i + 1]],
      split.input_ids[split.offsets[n + i]:split.offsets[n + i + 1]])
               for i in range(n))
  assert differ > 0.8 * n
  teacher, _ = hf.load_pretrained(teacher_dir, run.task.HEAD, 2)
  student_model = partition.merge(run.graphdef, run.state["params"],
                                  run.frozen)
  batch = run.train_batches.batch_at(0)
  expected = _ce(_logits(student_model, run.task, batch),
                 _softmax(_logits(teacher, run.task, batch)),
                 batch["weights"])
  assert _loss(run, batch) == pytest.approx(expected, rel=1e-5)

  # Copies made once: cached per example, the copies' targets included.
  config.method_options.augment.regenerate = "once"
  config.method_options.distill.teacher_logits = "cache"
  run = train.build(config)
  cached = np.asarray(run.frozen.methods["distill"]["outputs"][0])
  assert cached.shape == (2 * n, 2)
  for i in (0, n + 5, 2 * n - 1):
    a, b = run.train_split.offsets[i], run.train_split.offsets[i + 1]
    ids = jnp.asarray(run.train_split.input_ids[None, a:b])
    np.testing.assert_allclose(
        np.asarray(teacher(ids, jnp.ones_like(ids)))[0], cached[i],
        rtol=1e-5, atol=1e-5)
  # Copies made anew each epoch cannot be cached by index.
  config.method_options.augment.regenerate = "epoch"
  with pytest.raises(ConfigError, match="same training set every epoch"):
    train.build(config)


def test_unlabelled_text_adds_to_the_distillation_terms_only(
    tmp_path, layers_dir, teacher_dir):
  path = tmp_path / "unlabelled.tsv"
  path.write_text("sentence\n" + "".join(
      f"an unlabelled review number {i}, {'good' if i % 2 else 'bad'}\n"
      for i in range(40)))
  run = train.build(_config(layers_dir, teacher_dir, NO_DROPOUT,
                            unlabelled_file=str(path), hard=1.0, soft=1.0))
  split = run.train_split
  assert len(split) == 360
  np.testing.assert_array_equal(split.arrays["distill_labelled"],
                                [1.0] * 320 + [0.0] * 40)
  batcher = run.train_batches.__class__(split, 24, (32,), shuffle=False)
  batch = batcher.batch_at(13)  # examples 312..335: 8 labelled, 16 not
  labelled = batch["distill_labelled"]
  assert labelled.sum() == 8
  teacher, _ = hf.load_pretrained(teacher_dir, run.task.HEAD, 2)
  s = _logits(partition.merge(run.graphdef, run.state["params"], run.frozen),
              run.task, batch)
  t = _logits(teacher, run.task, batch)
  hard = _ce(s, np.eye(2)[np.maximum(batch["labels"], 0)], labelled)
  soft = _ce(s, _softmax(t), batch["weights"])
  assert _loss(run, batch) == pytest.approx(hard + soft, rel=1e-5)


# --- Bad settings --------------------------------------------------------------------


def test_bad_settings_name_the_option(tmp_path, layers_dir, teacher_dir,
                                      minilm_dir):
  with pytest.raises(ConfigError, match="distill.teacher is empty"):
    train.build(_config(layers_dir, ""))
  with pytest.raises(ConfigError, match="keeps the teacher's outputs only"):
    train.build(_config(layers_dir, teacher_dir, teacher_logits="cache",
                        hidden=1.0))
  with pytest.raises(ConfigError, match="layer_map='1-2'"):
    train.build(_config(layers_dir, teacher_dir, layer_map="1-2"))
  with pytest.raises(ConfigError, match="pair 3:2 names a layer past"):
    train.build(_config(layers_dir, teacher_dir, hidden=1.0,
                        layer_map="0:0,3:2"))
  with pytest.raises(ConfigError, match="attention_layers='7'"):
    train.build(_config(layers_dir, teacher_dir, attention=1.0,
                        attention_layers="7"))
  with pytest.raises(ConfigError, match="no trained SequenceClassification"):
    train.build(_config(layers_dir, str(minilm_dir)))
  other = create_model("sequence_classification", TEACHER, 2, seed=1)
  hf.export(other, tmp_path / "renamed", tokenizer_dir=minilm_dir,
            label_names=["positive", "negative"])
  with pytest.raises(ConfigError, match="labels .*'positive', 'negative'.* "
                     "are not the run's"):
    train.build(_config(layers_dir, str(tmp_path / "renamed")))
  two_heads = student.fresh(teacher_dir, tmp_path / "two_heads", {
      "num_hidden_layers": 2, "num_attention_heads": 2})
  with pytest.raises(ConfigError, match="teacher has 4 heads, the student 2"):
    train.build(_config(str(two_heads), teacher_dir, attention=1.0))
  with pytest.raises(ConfigError, match="'lora' changes the loss before"):
    config = _config(layers_dir, teacher_dir, methods=("lora", "distill"),
                     hidden=1.0)
    config.method_options.lora = methods_lib.with_defaults("lora",
                                                           dropout=0.1)
    train.build(config)
