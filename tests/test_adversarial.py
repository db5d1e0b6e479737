"""Adversarial training (methods fgm, pgd, freelb, smart) and the robust evaluator.

On the tiny BERT with MiniLM's tokenizer and the quickstart reviews: the
perturbations are checked against their definitions, computed here
independently of `research.methods.adversarial.embeddings` ([CLS]=101, [SEP]=102,
[PAD]=0, [MASK]=103 never move).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import tasks, train
from research.configs import ConfigError, validate
from research.methods import fgm, freelb, pgd, smart
from research.methods.adversarial import embeddings as adversarial
from research.tasks import common as task_common
from research.training.steps import value_and_grad
from tests.test_train import _tiny_config

# Jitted: eager op-by-op differentiation is slow.
_value_and_grad = jax.jit(lambda f, *args: value_and_grad(f)(*args),
                          static_argnums=0)

SPECIAL = (0, 101, 102, 103)


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles(compilation_cache):
  del compilation_cache


def _build(model_dir, **overrides):
  config = _tiny_config(model_dir, **{"total_steps": 8, "data.max_length": 32,
                                      "data.buckets": (32,), **overrides})
  return config, train.build(config)


@pytest.fixture(scope="module")
def built(tiny_model_dir):
  return _build(tiny_model_dir)


@pytest.fixture(scope="module")
def packed(tiny_model_dir):
  return _build(tiny_model_dir, **{"data.examples_per_row": 4,
                                   "data.buckets": (128,)})


def _made(method, run):
  """A method set up with the run's context, as `train.build` does."""
  method.setup(run.context)
  return method


def _pieces(run, step=0):
  batch = jax.tree.map(jnp.asarray, run.train_batches.batch_at(step))
  return (run.task.loss_fn(run.graphdef), run.state["params"], run.frozen,
          batch, jax.random.key(7))


def _mask(batch):
  """Real, non-special tokens, computed here in numpy."""
  ids = np.asarray(batch["input_ids"])
  return (np.asarray(batch["attention_mask"]) > 0) & ~np.isin(ids, SPECIAL)


def _groups(batch):
  """Per token, its example: (row, segment) in packed rows, else the row."""
  rows = np.broadcast_to(np.arange(batch["input_ids"].shape[0])[:, None],
                         batch["input_ids"].shape)
  seg = np.asarray(batch.get("segment_ids", np.zeros_like(rows)))
  return rows * 1000 + seg


def _per_example_norms(x, batch):
  """{example: L2 norm of x over its real non-special tokens}."""
  mask, groups = _mask(batch), _groups(batch)
  sq = np.square(np.asarray(x)).sum(-1)
  return {g: np.sqrt(sq[(groups == g) & mask].sum())
          for g in np.unique(groups[mask])}


@functools.partial(jax.jit, static_argnums=0)
def _grad_at(loss_fn, params, frozen, batch, key, delta):
  return jax.grad(lambda d: loss_fn(params, frozen, adversarial.with_delta(
      batch, d), key)[0])(delta)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fgm_perturbation_is_epsilon_times_normalised_gradient(
    layout, built, packed):
  config, run = built if layout == "padded" else packed
  loss_fn, params, frozen, batch, key = _pieces(run)
  assert ("segment_ids" in batch) == (layout == "packed")
  eps = 0.7
  delta, _ = jax.jit(_made(fgm.Method(config, epsilon=eps, norm="l2"), run).perturbation(
      loss_fn))(params, frozen, batch, key)
  hidden = run.model_cfg.hidden_size
  g = np.asarray(_grad_at(loss_fn, params, frozen, batch, key,
                          adversarial.zeros(batch, hidden)))
  mask, groups = _mask(batch), _groups(batch)
  # The gradient does reach special tokens: the mask is what stops them.
  assert np.abs(g[~mask & (np.asarray(batch["attention_mask"]) > 0)]).max() > 0
  norms = _per_example_norms(g, batch)
  assert len(norms) == 16  # every example of the batch on its own
  expected = np.zeros_like(g)
  for example, norm in norms.items():
    where = (groups == example) & mask
    expected[where] = eps * g[where] / norm
  np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(list(_per_example_norms(delta, batch).values()),
                             eps, rtol=1e-5)


def test_fgm_linf_is_epsilon_times_sign(built):
  config, run = built
  loss_fn, params, frozen, batch, key = _pieces(run)
  delta, _ = jax.jit(_made(fgm.Method(config, epsilon=0.01, norm="linf"), run)
                     .perturbation(loss_fn))(params, frozen, batch, key)
  g = _grad_at(loss_fn, params, frozen, batch, key,
               adversarial.zeros(batch, run.model_cfg.hidden_size))
  expected = 0.01 * np.sign(np.asarray(g)) * _mask(batch)[..., None]
  np.testing.assert_allclose(np.asarray(delta), expected, atol=1e-9)


def test_fgm_gradient_is_clean_plus_adversarial(built):
  config, run = built
  loss_fn, params, frozen, batch, key = _pieces(run)
  method = _made(fgm.Method(config, epsilon=0.5), run)
  (loss, aux), grads = jax.jit(method.grad_fn(value_and_grad)(loss_fn))(
      params, frozen, batch, key)
  delta, _ = jax.jit(method.perturbation(loss_fn))(params, frozen, batch, key)
  (clean, _), g_clean = _value_and_grad(loss_fn, params, frozen, batch, key)
  (adv, _), g_adv = _value_and_grad(
      loss_fn, params, frozen, adversarial.with_delta(batch, delta), key)
  assert adv > clean  # the perturbation does raise the loss
  np.testing.assert_allclose(loss, clean + adv, rtol=1e-5)
  assert float(aux["weight"]) == 16
  for a, b, c in zip(jax.tree.leaves(grads), jax.tree.leaves(g_clean),
                     jax.tree.leaves(g_adv)):
    np.testing.assert_allclose(a, b + c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_the_epsilon_ball_and_raises_the_loss(norm, built):
  config, run = built
  loss_fn, params, frozen, batch, key = _pieces(run)
  eps = 0.5 if norm == "l2" else 0.02
  # Steps of twice the radius: every step leaves the ball, the projection
  # must bring it back.
  method = _made(pgd.Method(config, epsilon=eps, step_size=2 * eps, steps=4,
                      norm=norm), run)
  delta, ((clean, _), _) = jax.jit(method.perturbation(loss_fn))(
      params, frozen, batch, key)
  delta = np.asarray(delta)
  assert not delta[~_mask(batch)].any()
  if norm == "l2":
    norms = np.array(list(_per_example_norms(delta, batch).values()))
    assert len(norms) == 16 and norms.max() <= eps * (1 + 1e-5)
    np.testing.assert_allclose(norms, eps, rtol=1e-5)  # on the boundary
  else:
    assert np.abs(delta).max() <= eps * (1 + 1e-6)
    assert np.abs(delta[_mask(batch)]).min() > 0
  adv, _ = jax.jit(loss_fn)(params, frozen,
                            adversarial.with_delta(batch, delta), key)
  assert adv > clean


def test_freelb_one_step_epsilon_zero_is_plain_training(tiny_model_dir):
  """Three updates through the real train step: the same parameters."""
  states = []
  for methods in [(), ("freelb",)]:
    config, run = _build(tiny_model_dir, methods=methods,
                         method_options={"freelb": {"epsilon": 0.0,
                                                    "steps": 1}}
                         if methods else {})
    state = run.state
    for step in range(3):
      batch = jax.tree.map(jnp.asarray, run.train_batches.batch_at(step))
      state, metrics = run.train_step(state, run.frozen, batch, step)
      assert metrics["grad_norm"] > 0
    states.append(state["params"])
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_freelb_averages_the_gradients_of_its_ascent_steps(built):
  config, run = built
  loss_fn, params, frozen, batch, key = _pieces(run)
  method = _made(freelb.Method(config, epsilon=0.3, step_size=0.2, steps=2,
                         init_magnitude=0.5), run)
  (loss, _), grads = jax.jit(method.grad_fn(value_and_grad)(loss_fn))(
      params, frozen, batch, key)
  hidden = run.model_cfg.hidden_size
  mask = jnp.asarray(_mask(batch), jnp.float32)
  start = adversarial.random_init(
      jax.random.fold_in(key, adversarial.INIT_STREAM), batch, mask, hidden,
      magnitude=0.5, epsilon=0.3, norm="l2")
  g = _grad_at(loss_fn, params, frozen, batch, key, start)
  second = adversarial.ascend(start, g, batch, mask, step_size=0.2,
                              epsilon=0.3, norm="l2")
  outs = [_value_and_grad(loss_fn, params, frozen, adversarial.with_delta(
      batch, d), key) for d in (start, second)]
  np.testing.assert_allclose(loss, (outs[0][0][0] + outs[1][0][0]) / 2,
                             rtol=1e-5)
  for a, b, c in zip(jax.tree.leaves(grads), jax.tree.leaves(outs[0][1]),
                     jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["fgm", "pgd", "freelb", "smart"])
def test_no_perturbation_reaches_padding_or_special_tokens(name, built):
  """Every perturbation any forward pass of the method sees, recorded."""
  config, run = built
  loss_fn, params, frozen, batch, key = _pieces(run, step=1)
  seen = []

  def spy(trainable, frozen_, batch_, key_):
    if adversarial.DELTA in batch_:
      jax.debug.callback(lambda d: seen.append(np.asarray(d)),
                         batch_[adversarial.DELTA])
    return loss_fn(trainable, frozen_, batch_, key_)

  method = _made({"fgm": fgm, "pgd": pgd, "freelb": freelb, "smart": smart}[
      name].Method(config, **({} if name == "fgm" else {"steps": 3})), run)
  jax.block_until_ready(jax.jit(method.grad_fn(value_and_grad)(spy))(
      params, frozen, batch, key))
  jax.effects_barrier()
  mask = _mask(batch)
  assert (np.asarray(batch["attention_mask"]) == 0).any()  # padding present
  assert len(seen) >= {"fgm": 2, "pgd": 4, "freelb": 3, "smart": 4}[name]
  assert any(np.abs(d[mask]).max() > 0 for d in seen)
  for d in seen:
    assert not d[~mask].any()


def _sym_kl(a, b):
  """Symmetric KL between the softmaxes of a and b, per row, in numpy."""
  def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  la, lb = log_softmax(a), log_softmax(b)
  pa, pb = np.exp(la), np.exp(lb)
  return (pa * (la - lb)).sum(-1) + (pb * (lb - la)).sum(-1)


def test_smart_divergence_is_the_weighted_symmetric_kl():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 4, 3)).astype(np.float32)
  weights = np.array([1.0, 0.0, 2.0, 1.0], np.float32)  # row 1: padding
  per = _sym_kl(a, b)
  np.testing.assert_allclose(smart.divergence(a, b, weights),
                             (per * weights).sum() / 4, rtol=1e-5)
  assert float(smart.divergence(a, a, weights)) == 0
  # Regression: the squared difference.
  np.testing.assert_allclose(
      smart.divergence(a[:, :1], b[:, :1], weights),
      ((a[:, 0] - b[:, 0]) ** 2 * weights).sum() / 4, rtol=1e-5)
  # Token outputs [B, L, C]: per real token of a real row, as the token
  # tasks weight them (`Task.distributions`).
  a, b = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  mask = (np.arange(5)[None] < np.array([[5], [3], [1], [2]])).astype(np.int32)
  batch = {"weights": weights, "attention_mask": mask}
  w = weights[:, None] * mask
  config = _tiny_config("unused", task="token_classification")
  task = tasks.load(config)
  (dist, got_w), = task.distributions(jnp.asarray(a), batch)
  np.testing.assert_array_equal(got_w, w)
  np.testing.assert_allclose(smart.total_divergence(task, a, b, batch),
                             (_sym_kl(a, b) * w).sum() / w.sum(), rtol=1e-5)
  # Question answering: the start and the end distributions, summed.
  config.task = "question_answering"
  config.data.text_fields = ("question", "context")
  task = tasks.load(config)
  starts, ends = rng.normal(size=(2, 2, 4, 5)).astype(np.float32)
  got = smart.total_divergence(task, (starts[0], ends[0]),
                               (starts[1], ends[1]), batch)
  masked = lambda x: np.where(mask > 0, x, np.finfo(np.float32).min)  # pylint: disable=unnecessary-lambda-assignment
  want = sum((_sym_kl(masked(x[0]), masked(x[1])) * weights).sum()
             / weights.sum() for x in (starts, ends))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_smart_gradient_is_the_loss_plus_the_divergence_at_its_delta(built):
  config, run = built
  loss_fn, params, frozen, batch, key = _pieces(run)
  method = _made(smart.Method(config, weight=2.0, epsilon=0.3, step_size=0.5,
                        noise=0.01), run)
  delta = np.asarray(jax.jit(method.perturbation(loss_fn))(
      params, frozen, batch, key))
  mask = _mask(batch)
  assert not delta[~mask].any()
  # One step of 0.5 from small noise leaves the ball: on its boundary.
  np.testing.assert_allclose(list(_per_example_norms(delta, batch).values()),
                             0.3, rtol=1e-5)

  # The step: from the noise along the gradient of the divergence from the
  # clean logits (held constant), then back onto the ball.
  def logits(d):
    return jax.jit(loss_fn)(params, frozen,
                            adversarial.with_delta(batch, d), key)[1]["outputs"]
  clean = np.asarray(logits(jnp.zeros_like(delta)))
  start = (np.asarray(jax.random.normal(
      jax.random.fold_in(key, adversarial.INIT_STREAM), delta.shape)) * 0.01
           * mask[..., None])
  assert max(_per_example_norms(start, batch).values()) < 0.3
  g = jax.grad(lambda d: smart.divergence(clean, logits(d),
                                          batch["weights"]))(
      jnp.asarray(start))
  want = adversarial.ascend(jnp.asarray(start), g, batch,
                            jnp.asarray(mask, jnp.float32), step_size=0.5,
                            epsilon=0.3, norm="l2")
  np.testing.assert_allclose(delta, want, atol=1e-6)
  w = np.asarray(batch["weights"])

  (loss, aux), grads = jax.jit(method.grad_fn(value_and_grad)(loss_fn))(
      params, frozen, batch, key)

  def expected(p):
    clean_loss, clean_aux = loss_fn(p, frozen, batch, key)
    adv = loss_fn(p, frozen, adversarial.with_delta(batch, delta), key)[1]
    p_a = jax.nn.log_softmax(clean_aux["outputs"])
    p_b = jax.nn.log_softmax(adv["outputs"])
    per = jnp.sum((jnp.exp(p_a) - jnp.exp(p_b)) * (p_a - p_b), -1)
    return clean_loss + 2.0 * jnp.sum(per * w) / w.sum()

  value, want = jax.jit(jax.value_and_grad(expected))(params)
  kl = np.sum(_sym_kl(clean, np.asarray(logits(delta))) * w) / w.sum()
  assert kl > 0
  np.testing.assert_allclose(loss, float(loss_fn(params, frozen, batch, key)[0])
                             + 2.0 * kl, rtol=1e-4)
  np.testing.assert_allclose(loss, value, rtol=1e-5)
  assert float(aux["weight"]) == 16
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_smart_with_weight_zero_is_plain_training(built):
  config, run = built
  loss_fn, params, frozen, batch, key = _pieces(run)
  (loss, _), grads = jax.jit(_made(smart.Method(config, weight=0.0), run).grad_fn(
      value_and_grad)(loss_fn))(params, frozen, batch, key)
  (plain, _), want = _value_and_grad(loss_fn, params, frozen, batch, key)
  np.testing.assert_allclose(loss, plain, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_options_name_the_field(tiny_model_dir):
  config = _tiny_config(tiny_model_dir, methods=("pgd",))
  config.method_options = {"pgd": {"norm": "l1"}}
  with pytest.raises(ConfigError, match=r"method_options\.pgd\.norm.*l2, linf"):
    train.build(config)
  config.method_options = {"pgd": {"steps": 0}}
  with pytest.raises(ConfigError, match=r"method_options\.pgd\.steps"):
    train.build(config)
  config.methods = ("smart",)
  config.method_options = {"smart": {"weight": -1.0}}
  with pytest.raises(ConfigError, match=r"method_options\.smart\.weight"):
    train.build(config)
  config.method_options = {}
  config.task = __name__  # a task without output distributions (below)
  with pytest.raises(ConfigError, match=r"'smart'.*config\.task='tests\."
                     r"test_adversarial' defines no Task\.distributions"):
    validate(config)


class Task(task_common.Task):
  """A task module's Task without `distributions` (SMART must refuse it)."""

  def finish(self, name, enc, names, training):
    raise AssertionError("never reached")

  def loss(self, outputs, batch):
    raise AssertionError("never reached")

  def predict(self, outputs, batch):
    raise AssertionError("never reached")


POSITIVE, NEGATIVE = ("good", "great", "fine", "nice"), ("bad", "awful",
                                                      "poor", "sad")
FILLER = ("the", "a", "film", "was", "and", "it", "very", "story", "of",
          "this", "one", "plot", "actors", "in")


def _keyword_rows(n, seed):
  """Reviews whose label is their one sentiment word, among filler."""
  rng = np.random.default_rng(seed)
  lines = ["sentence\tlabel"]
  for _ in range(n):
    label = int(rng.integers(2))
    words = list(rng.choice(FILLER, rng.integers(4, 10)))
    words.insert(int(rng.integers(len(words) + 1)),
                 str(rng.choice(POSITIVE if label else NEGATIVE)))
    lines.append(" ".join(words) + f"\t{label}")
  return "\n".join(lines) + "\n"


def test_robust_evaluator_reports_clean_attacked_and_typo_metrics(
    tmp_path, tiny_model_dir):
  (tmp_path / "train.tsv").write_text(_keyword_rows(320, 0))
  (tmp_path / "dev.tsv").write_text(_keyword_rows(96, 1))
  config = _tiny_config(tiny_model_dir, **{
      "total_steps": 80, "eval_every_steps": 80, "data.max_length": 16,
      "data.buckets": (16,), "data.train_file": str(tmp_path / "train.tsv"),
      "data.eval_file": str(tmp_path / "dev.tsv"), "data.label_names": (),
      "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
      "optimizer.learning_rate": 5e-3})
  config.evals = {"dev": {"type": "robust", "split": "validation",
                          "epsilon": 2.0, "step_size": 1.0, "steps": 3,
                          "typo_rate": 1.0}}
  config.eval_metric = "pgd_accuracy"
  out = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert out["eval/accuracy"] > 0.9  # learnt the sentiment words
  # The attack, inside the ball, flips predictions and raises the loss.
  assert out["eval/pgd_accuracy"] < out["eval/accuracy"] - 0.2
  assert out["eval/pgd_loss"] > out["eval/loss"]
  # Every word misspelt: the sentiment words become unknown pieces.
  assert out["eval/typo_accuracy"] < out["eval/accuracy"] - 0.1
  assert out["best/eval/pgd_accuracy"] == out["eval/pgd_accuracy"]
