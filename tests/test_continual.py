"""Continual learning: EWC and L2-SP, the replay buffer, the model registry
and promotion gate, rounds from the feedback store (resume after SIGKILL),
and the metrics of forgetting."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import data, tasks, train
from research.data import splits
from research.methods import ewc, l2_sp
from research.training import partition
from research.training.checkpointing import Checkpointer
from tests.conftest import TESTDATA  # pylint: disable=unused-import
from tests.test_train import _tiny_config

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "data",
                          "quickstart")


def _latest_params(workdir):
  with Checkpointer(workdir) as ckpt:
    _, state, _ = ckpt.restore(None)
  return state["params"]


def test_fisher_is_the_mean_of_squared_per_example_gradients(tiny_model_dir):
  """EWC's diagonal, through DP-SGD's per-example machinery, equals a loop
  of one `jax.grad` per example, squared and averaged (padding rows: none
  counted)."""
  config = _tiny_config(tiny_model_dir, **{"data.max_length": 32})
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  task = tasks.load(config, tokenizer)
  model_cfg, graphdef, params, frozen = train.load_model(
      config, task, [], str(tiny_model_dir))
  del model_cfg
  split = splits.load_file(config, tokenizer, task,
                           os.path.join(QUICKSTART, "dev.tsv"), "fisher",
                           ["negative", "positive"]).head(7)
  # Batches of 4: the second holds 3 examples and a padding row.
  got = ewc.fisher_diagonal(task, graphdef, params, frozen, split, 4,
                            chunk_size=2)

  def loss(p, example):
    model = partition.merge(graphdef, p, frozen)
    losses, weights = task.loss(task.forward(model, example), example)
    return (losses * weights).sum() / weights.sum()

  batcher = data.Batcher(split, 1, (), shuffle=False)
  squares = []
  for batch in batcher.eval_batches():
    g = jax.grad(loss)(params, {k: jnp.asarray(v) for k, v in batch.items()})
    squares.append(jax.tree.map(jnp.square, g))
  want = jax.tree.map(lambda *x: sum(x) / len(x), *squares)
  assert len(squares) == 7
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                               atol=1e-12)
  assert max(float(jnp.max(x)) for x in jax.tree.leaves(got)) > 0


def test_ewc_and_l2_sp_with_weight_zero_equal_naive_fine_tuning(
    tmp_path, tiny_model_dir, compilation_cache):
  """Same seed, same data: the penalty's gradient is 0 at weight 0, so the
  trained weights are the same arrays as without the method; with weight
  > 0 they stay closer to the start, by the distance each one weighs
  (L2-SP: plain; EWC: Fisher-weighted)."""
  del compilation_cache
  fisher_file = os.path.join(QUICKSTART, "dev.tsv")
  base = {"total_steps": 16, "eval_every_steps": 16, "data.max_length": 32,
          "data.buckets": (32,)}
  ewc_options = {"fisher_file": fisher_file, "fisher_examples": 16}
  runs = {}
  for name, methods, options in (
      ("naive", (), {}),
      ("ewc0", ("ewc",), {"ewc": {"weight": 0.0, **ewc_options}}),
      ("l2sp0", ("l2_sp",), {"l2_sp": {"weight": 0.0}}),
      ("ewc", ("ewc",), {"ewc": {"weight": 100.0, **ewc_options}}),
      ("l2sp", ("l2_sp",), {"l2_sp": {"weight": 100.0}})):
    config = _tiny_config(tiny_model_dir, **base)
    config.methods = methods
    config.method_options = options
    train.train_and_evaluate(config, str(tmp_path / name))
    runs[name] = _latest_params(str(tmp_path / name))
  naive = jax.tree.leaves(runs["naive"])
  for name in ("ewc0", "l2sp0"):
    for a, b in zip(naive, jax.tree.leaves(runs[name]), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The start and the Fisher: as the runs computed them.
  config = _tiny_config(tiny_model_dir, **base)
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  task = tasks.load(config, tokenizer)
  _, graphdef, start, frozen = train.load_model(config, task, [],
                                                str(tiny_model_dir))
  fisher = ewc.fisher_diagonal(task, graphdef, start, frozen, splits.load_file(
      config, tokenizer, task, fisher_file, "fisher",
      ["negative", "positive"]).head(16), 32)
  plain = {n: float(l2_sp.penalty(runs[n], start)) for n in ("naive", "l2sp")}
  weighted = {n: float(l2_sp.penalty(runs[n], start, fisher))
              for n in ("naive", "ewc")}
  assert plain["l2sp"] < 0.5 * plain["naive"], plain
  assert weighted["ewc"] < 0.5 * weighted["naive"], weighted
