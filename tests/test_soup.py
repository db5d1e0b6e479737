"""Model soups and logit ensembles (research/soup.py), offline and served.

Three tiny runs (the 2-layer `tiny_model_dir` model on the quickstart set,
a few steps) share their head initialisation (`model.init_seed=0`) and
differ in `seed` (data order, dropout): the soups' averages, the greedy
rule, the ensembles' logits and the refusals are checked on them with exact
numbers; the ensemble directory and a soup's registry version are served
and answer as the offline evaluation does.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from research import restore, soup, train
from research.continual.registry import Registry
from research.data import splits as splits_lib
from research.evaluators import sequence
from research.serve import engine as engine_lib
from tests.test_train import _tiny_config

QUICKSTART_DEV = os.path.join(os.path.dirname(__file__), "..", "data",
                              "quickstart", "dev.tsv")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, compilation_cache):
  """Three restored tiny runs: init_seed 0, seeds 0, 1, 2."""
  del compilation_cache
  root = tmp_path_factory.mktemp("soup_runs")
  out = []
  for seed in range(3):
    config = _tiny_config(tiny_model_dir, total_steps=6, eval_every_steps=6,
                          log_every_steps=6, seed=seed,
                          **{"model.init_seed": 0, "data.buckets": (64,),
                             "data.max_length": 64})
    workdir = str(root / f"seed{seed}")
    train.train_and_evaluate(config, workdir)
    out.append(restore.restore_run(workdir, "latest"))
  return out


@pytest.fixture(scope="module")
def dev(runs, tmp_path_factory):
  """The first 24 quickstart dev rows as a split of the runs' task."""
  with open(QUICKSTART_DEV, encoding="utf-8") as f:
    lines = f.readlines()
  path = tmp_path_factory.mktemp("soup_data") / "dev24.tsv"
  path.write_text("".join(lines[:25]), encoding="utf-8")
  r = runs[0]
  return splits_lib.load_file(r.config, r.tokenizer, r.task, str(path),
                              "dev24", r.label_names)


def _leaves(restored):
  """The model's weights, by path (as numpy)."""
  state = nnx.state(restored.model, nnx.Param)
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _predict(restored, split):
  evaluator = restored.make_evaluator(split, 8, (64,), logits=True)
  return evaluator.predict(restored.params, restored.frozen)


def test_the_runs_differ_and_share_their_head_init(runs):
  a, b = _leaves(runs[0]), _leaves(runs[1])
  assert max(float(np.abs(a[k] - b[k]).max()) for k in a) > 1e-4
  assert all(int(r.config.model.init_seed) == 0 for r in runs)
  assert [int(r.config.seed) for r in runs] == [0, 1, 2]


def test_init_seed_fixes_the_head_and_minus_one_means_seed(tiny_model_dir):
  from research import tasks, data  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  tokenizer = data.load_tokenizer(str(tiny_model_dir))

  def head(**overrides):
    """A 3-class head the 2-class checkpoint lacks: drawn by the seed."""
    task = tasks.load(_tiny_config(tiny_model_dir, **overrides), tokenizer)
    model, _ = hf.load_pretrained(str(tiny_model_dir), task.HEAD, 3,
                                  **task.model_options())
    return np.asarray(model.classifier.kernel[...])

  shared = head(seed=1, **{"model.init_seed": 7})
  np.testing.assert_array_equal(shared, head(seed=2, **{"model.init_seed": 7}))
  # -1 (the default) draws the head from config.seed, as before the field.
  np.testing.assert_array_equal(head(seed=7), shared)
  assert not np.array_equal(head(seed=1), shared)


def test_a_soup_of_one_is_that_model(runs, dev):
  one = soup.uniform_soup([runs[0]])
  want, got = _leaves(runs[0]), _leaves(one)
  assert want.keys() == got.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  a, b = _predict(runs[0], dev), _predict(one, dev)
  np.testing.assert_array_equal(a["predictions"], b["predictions"])
  np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-6, atol=1e-6)


def test_the_uniform_soup_is_the_elementwise_mean(runs):
  a, b = _leaves(runs[0]), _leaves(runs[1])
  got = _leaves(soup.uniform_soup(runs[:2]))
  for k in a:
    mean = ((a[k].astype(np.float64) + b[k]) / 2).astype(np.float32)
    np.testing.assert_array_equal(got[k], mean, err_msg=k)


def test_greedy_soup_adds_a_run_only_when_the_score_does_not_drop(runs):
  ingredients = soup.Ingredients(runs)

  def which(restored):
    """The set of runs a candidate averages (by its weights)."""
    got = [np.asarray(x) for x in jax.tree.leaves(restored.params)]
    for subset in ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)):
      want = ingredients.average(subset)
      if all(np.allclose(g, w, rtol=1e-6, atol=1e-8)
             for g, w in zip(got, want)):
        return subset
    raise AssertionError("not a soup of the runs")

  # Alone: run 1 best, then 0, then 2. With 0 the soup drops (rejected);
  # with 2 it ties (accepted: "does not drop").
  table = {(0,): 0.80, (1,): 0.90, (2,): 0.70, (0, 1): 0.85, (1, 2): 0.90,
           (0, 2): 0.65, (0, 1, 2): 0.99}
  calls = []

  def score(restored):
    calls.append(which(restored))
    return table[calls[-1]]

  result = soup.greedy_soup(ingredients, score)
  assert calls == [(0,), (1,), (2,), (0, 1), (1, 2)]
  assert [r.workdir for r in result.members] == [runs[1].workdir,
                                                  runs[2].workdir]
  assert result.score == 0.90
  assert [t[3] for t in result.trials] == [True, False, True]
  assert which(result.soup) == (1, 2)
  # mode "min" (a loss): run 2 first; 0 lowers the score (joins), then 1
  # raises it (rejected).
  calls.clear()
  low = soup.greedy_soup(ingredients, score, mode="min")
  assert calls[3:] == [(0, 2), (0, 1, 2)]
  assert [r.workdir for r in low.members] == [runs[2].workdir,
                                               runs[0].workdir]
  assert low.score == 0.65


def test_ensemble_logits_are_the_members_mean(runs, dev):
  alone = soup.outputs(runs[0], dev, 8)
  one = soup.ensemble_logits([runs[0]], dev, 8)
  np.testing.assert_array_equal(one["logits"], alone["logits"])
  np.testing.assert_array_equal(one["predictions"], alone["predictions"])
  assert one["metrics"] == alone["metrics"]

  two = soup.ensemble_logits(runs[:2], dev, 8)
  a, b = (m["logits"] for m in two["members"])
  np.testing.assert_allclose(two["logits"], (a + b) / 2, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(two["predictions"],
                                np.argmax(two["logits"], axis=-1))
  labels = alone["labels"]
  assert two["metrics"]["accuracy"] == pytest.approx(
      float(np.mean(two["predictions"] == labels)))


def _copy_run(run, dest, edit_config=None, labels=None):
  shutil.copytree(run.workdir, dest, ignore=shutil.ignore_patterns("cache"))
  if edit_config:
    path = os.path.join(dest, "config.json")
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    edit_config(config)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(config, f)
  if labels is not None:
    with open(os.path.join(dest, "labels.json"), "w", encoding="utf-8") as f:
      json.dump(labels, f)
  return restore.restore_run(str(dest), "latest")


def test_runs_that_cannot_be_souped_are_refused_naming_both(runs, tmp_path,
                                                            tiny_model_dir):
  relabelled = _copy_run(runs[1], tmp_path / "relabelled",
                         labels=["bad", "good"])
  with pytest.raises(ValueError, match="label names") as e:
    soup.uniform_soup([runs[0], relabelled])
  assert runs[0].workdir in str(e.value) and relabelled.workdir in str(e.value)
  with pytest.raises(ValueError, match="label names"):
    soup.ensemble_logits([runs[0], relabelled], None)

  # Another checkpoint (a copy of the tiny model elsewhere): no soup, but
  # an ensemble is fine.
  other_model = shutil.copytree(tiny_model_dir, tmp_path / "other_model")
  moved = _copy_run(runs[1], tmp_path / "other_checkpoint",
                    edit_config=lambda c: c["model"].update(
                        name=str(other_model)))
  with pytest.raises(ValueError, match="model.name") as e:
    soup.uniform_soup([runs[0], moved])
  assert runs[0].workdir in str(e.value) and moved.workdir in str(e.value)
  soup.check_compatible([runs[0], moved], soup=False)

  # Another head initialisation: a warning, not a refusal.
  reseeded = _copy_run(runs[1], tmp_path / "reseeded",
                       edit_config=lambda c: c["model"].update(init_seed=5))
  with pytest.warns(UserWarning, match="init_seed"):
    soup.uniform_soup([runs[0], reseeded])


def test_compare_reports_every_row(runs, dev):
  result = soup.compare(runs, dev.head(12), dev, batch_size=8)
  single = [soup.outputs(r, dev, 8)["metrics"]["accuracy"] for r in runs]
  assert result["single"] == single
  assert result["best_single"][1] == max(single)
  assert 0.0 <= result["uniform"] <= 1.0 and 0.0 <= result["greedy"] <= 1.0
  assert result["greedy_members"][0] in [r.workdir for r in runs]
  table = soup.format_table(result)
  assert table.count("\n") == 6 and "greedy soup" in table, table


def test_served_ensemble_and_soup_answer_as_offline(runs, dev, tmp_path):
  texts = [{"text": t} for t in _texts(24)]
  options = dict(limits=engine_lib.Limits(max_inputs=32),
                 batching_options=engine_lib.Batching(max_batch=4,
                                                      batch_sizes=(1, 4)),
                 explain_methods=())
  names = runs[0].label_names

  ensemble_dir = soup.write_ensemble(str(tmp_path / "ensemble"), runs[:2])
  offline = soup.ensemble_logits(runs[:2], dev, 8)["predictions"]
  engine = engine_lib.load(ensemble_dir, **options)
  try:
    engine.start(block=True)
    served = [a["label"] for a in engine.predict(texts)]
    assert engine.backend.name.startswith("ensemble of 2")
  finally:
    engine.close()
  assert served == [names[i] for i in offline]

  soup_model = soup.uniform_soup(runs[:2])
  version = Registry(str(tmp_path / "registry")).add(soup_model, kind="soup")
  path = str(tmp_path / "registry" / "versions" / version)
  offline = _predict(soup_model, dev)["predictions"]
  engine = engine_lib.load(path, **options)
  try:
    engine.start(block=True)
    served = [a["label"] for a in engine.predict(texts)]
  finally:
    engine.close()
  assert served == [names[i] for i in offline]


def _texts(n):
  with open(QUICKSTART_DEV, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    column = header.index("sentence")
    return [next(f).rstrip("\n").split("\t")[column] for _ in range(n)]
