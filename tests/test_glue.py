"""GLUE: the nine configs on mock TFDS data, GLUE facts, test predictions."""

import importlib
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from research import data, predict, train
from research.configs import validate
from research import glue, results

TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
# The eval metrics each config must log; the first one selects checkpoints.
EVAL_KEYS = {
    "cola": ("eval/matthews_corrcoef", "eval/accuracy"),
    "sst2": ("eval/accuracy",),
    "mrpc": ("eval/f1", "eval/accuracy"),
    "stsb": ("eval/spearman", "eval/pearson"),
    "qqp": ("eval/f1", "eval/accuracy"),
    "mnli": ("eval/validation_matched/accuracy",
             "eval/validation_mismatched/accuracy"),
    "qnli": ("eval/accuracy",),
    "rte": ("eval/accuracy",),
    "wnli": ("eval/accuracy",),
}
MOCK_EXAMPLES = 8  # per split


def _experiment(task):
  return importlib.import_module(f"experiments.glue_{task}")


def tiny(config, model_dir):
  """Test-size settings on top of a GLUE config."""
  config.model.name = str(model_dir)
  config.wandb.mode = "disabled"
  # One device of the 8 simulated ones: half the compile time of a mesh.
  config.parallelism.mesh_shape = (1, 1, 1)
  config.batch_size = 8
  config.eval_batch_size = 8
  config.total_steps = 2
  config.data.max_length = 32
  config.data.buckets = (32,)  # One shape: one compilation.
  config.log_every_steps = 1
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, compilation_cache):
  """`trained(task)` -> (workdir, summary): 2 steps on mock data, once each."""
  del compilation_cache
  runs = {}

  def get(task):
    if task not in runs:
      config = tiny(_experiment(task).get_config(), tiny_model_dir)
      workdir = str(tmp_path_factory.mktemp(task))
      with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        runs[task] = workdir, train.train_and_evaluate(config, workdir)
    return runs[task]

  return get


@pytest.mark.parametrize("task", TASKS)
def test_config_trains_two_steps_on_mock_data(task, trained):
  workdir, summary = trained(task)
  config = _experiment(task).get_config()
  assert config.data.source == "tfds" and config.data.name == f"glue/{task}"
  assert summary["final_step"] == 2
  keys = EVAL_KEYS[task]
  assert summary[f"best/{keys[0]}"] == summary[keys[0]]  # One eval, at step 2.
  for key in keys:
    value = summary[key]
    assert math.isfinite(value) and -1.0 <= value <= 1.0, (key, value)
    if key.endswith("accuracy"):  # Every dev example counted once.
      count = value * MOCK_EXAMPLES
      assert count == pytest.approx(round(count))
  logged = {k.rsplit("/", 1)[-1] for k in summary if k.startswith("eval/")}
  assert logged == {"loss", *(k.rsplit("/", 1)[-1] for k in keys)}
  expected_labels = list(glue.TASKS[task].labels)  # [] for STS-B.
  assert list(data.load_label_names(os.path.join(workdir, "labels.json"))) \
      == expected_labels


def test_every_config_validates_with_every_model_and_source():
  for task in TASKS:
    module = _experiment(task)
    for model in ("bert-base-uncased", "bert-large-cased"):
      for source in ("tfds", "hf"):
        config = module.get_config(f"model={model},source={source}")
        validate(config)
        assert config.model.name == f"google-bert/{model}"
        assert glue.task_of(config) == task
        if source == "hf":
          assert (config.data.name, config.data.hf_config) == (
              "nyu-mll/glue", task)
    config = module.get_config()
    # The paper's recipe.
    assert (config.batch_size, config.num_epochs, config.data.max_length) == (
        32, 3.0, 128)
    assert (config.optimizer.name, config.optimizer.schedule,
            config.optimizer.warmup_proportion,
            config.optimizer.weight_decay) == ("adamw", "linear", 0.1, 0.01)
    assert config.model.hidden_dropout == config.model.attention_dropout == 0.1
    assert config.eval_metric == EVAL_KEYS[task][0].rsplit("/", 1)[-1]
  stsb = _experiment("stsb").get_config()
  assert stsb.num_labels == 1 and stsb.data.label_names == ()
  mnli = _experiment("mnli").get_config()
  assert tuple(mnli.data.eval_splits) == ("validation_matched",
                                          "validation_mismatched")


def test_arg_errors_name_the_valid_choices():
  module = _experiment("sst2")
  with pytest.raises(ValueError, match="'modle' is not a key of this experiment; "
                     "valid: model, source, seeds, grid"):
    module.get_config("modle=bert-base-cased")
  with pytest.raises(ValueError, match="model='bert-huge'; valid: "
                     "bert-base-uncased, bert-base-cased, bert-large-uncased"):
    module.get_config("model=bert-huge")
  with pytest.raises(ValueError, match="source='csv'; valid: tfds, hf"):
    module.get_config("source=csv")
  with pytest.raises(ValueError, match="seeds='two': expected a value of type int"):
    module.get_sweep("seeds=two")


def test_sweeps_are_the_papers_grid():
  grid = _experiment("rte").get_sweep()
  assert grid == {"optimizer.learning_rate": [5e-5, 4e-5, 3e-5, 2e-5],
                  "seed": [0, 1, 2, 3, 4]}
  full = _experiment("rte").get_sweep("grid=full,seeds=2")
  assert full["batch_size"] == [16, 32]
  assert full["num_epochs"] == [2.0, 3.0, 4.0]
  assert full["seed"] == [0, 1]


def test_mock_glue_texts_tokenize(tiny_model_dir):
  """The mock texts are random letters; they must make real word pieces."""
  config = tiny(_experiment("mnli").get_config(), tiny_model_dir)
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    train_split, evals, names, _ = data.load_splits(config, tokenizer)
  assert names == ("entailment", "neutral", "contradiction")
  assert len(train_split) == MOCK_EXAMPLES
  assert set(evals) == {"validation_matched", "validation_mismatched"}
  # [CLS] premise [SEP] hypothesis [SEP]: more than the 3 special tokens.
  assert (train_split.lengths > 5).all()
  assert (train_split.token_type_ids == 1).any()  # The second text is there.
  unk = np.mean(train_split.input_ids == tokenizer.unk_token_id)
  assert unk < 0.1


def test_glue_metric_keys_and_submission_formats():
  assert results.metric_key("eval/accuracy") == "accuracy"
  assert results.metric_key("eval/validation_mismatched/accuracy") == \
      "mismatched/accuracy"
  # Entailment tasks are written as label names, the others as GLUE ids,
  # whatever order the run numbered its labels in.
  assert glue.submission_labels("mnli", ("contradiction", "entailment",
                                         "neutral")) == [
                                             "contradiction", "entailment",
                                             "neutral"]
  assert glue.submission_labels("rte", ("0", "1")) == ["entailment",
                                                       "not_entailment"]
  assert glue.submission_labels("wnli", ("entailment", "not_entailment")) == [
      "1", "0"]
  assert glue.submission_labels("cola", ("unacceptable", "acceptable")) == [
      "0", "1"]
  with pytest.raises(ValueError, match="'maybe' of the run is not a GLUE qqp "
                     "label; valid: not_duplicate, duplicate"):
    glue.submission_labels("qqp", ("not_duplicate", "maybe"))
  # STS-B: scores clipped to GLUE's [0, 5].
  assert [glue.format_score(v) for v in (-0.3, 2.345678, 5.7)] == [
      "0.0000", "2.3457", "5.0000"]
  assert glue.task_of({"data": {"source": "local", "name": ""}}) is None
  assert glue.task_of({"data": {"source": "tfds", "name": "glue/ax"}}) is None


def _words(rng, n):
  vocab = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away",
           "big", "red", "house", "near", "river", "slowly"]
  return " ".join(rng.choice(vocab, size=n))


def _mock_test_splits(sizes, regression=False):
  """A TFDS `as_dataset` mock: unlabeled test splits whose idx are shuffled.

  Args:
    sizes: {(glue config, split): number of examples}.
    regression: STS-B's float labels (and its column names).

  Returns:
    (as_dataset function, {(config, split): list of example dicts in the
    order TFDS yields them}).
  """
  rng = np.random.default_rng(0)
  examples = {}
  for (name, split), n in sizes.items():
    a, b = (("sentence1", "sentence2") if regression
            else ("premise", "hypothesis"))
    idx = rng.permutation(n)  # Not the read order, as in real TFDS files.
    examples[(name, split)] = [
        {a: _words(rng, 2 + 3 * i), b: _words(rng, 3), "idx": int(idx[i]),
         "label": -1.0 if regression else -1} for i in range(n)]

  def as_dataset(self, split, **kwargs):
    del kwargs
    rows = examples[(self.builder_config.name, str(split))]
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    return tf.data.Dataset.from_tensor_slices({
        k: np.asarray(v, np.float32 if k == "label" and regression else
                      np.int64 if k == "label" else
                      np.int32 if k == "idx" else object)
        for k, v in columns.items()})

  return as_dataset, examples


def _read_tsv(path):
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  return lines[0], [line.split("\t") for line in lines[1:]]


def test_predict_writes_mnli_and_ax_files(trained, tmp_path):
  workdir, _ = trained("mnli")
  sizes = {("mnli", "test_matched"): 7, ("mnli", "test_mismatched"): 5,
           ("ax", "test"): 3}
  as_dataset, _ = _mock_test_splits(sizes)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    written = predict.predict_run(workdir, str(tmp_path / "out"))
  assert written == {"MNLI-m.tsv": 7, "MNLI-mm.tsv": 5, "AX.tsv": 3}
  assert sorted(os.listdir(tmp_path / "out")) == ["AX.tsv", "MNLI-m.tsv",
                                                  "MNLI-mm.tsv"]
  for filename, n in written.items():
    header, rows = _read_tsv(tmp_path / "out" / filename)
    assert header == "index\tprediction"
    assert [int(i) for i, _ in rows] == list(range(n))
    assert {p for _, p in rows} <= {"entailment", "neutral", "contradiction"}


def test_predict_pairs_each_index_with_its_example(trained, tmp_path,
                                                   tiny_model_dir, monkeypatch):
  """STS-B: real scores, then a prediction we can recompute per example."""
  workdir, _ = trained("stsb")
  as_dataset, examples = _mock_test_splits({("stsb", "test"): 9},
                                           regression=True)
  rows_in_order = examples[("stsb", "test")]
  assert [r["idx"] for r in rows_in_order] != list(range(9))
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    predict.predict_run(workdir, str(tmp_path / "model"))
    header, rows = _read_tsv(tmp_path / "model" / "STS-B.tsv")
    assert header == "index\tprediction" and len(rows) == 9
    scores = [float(p) for _, p in rows]
    assert all(0.0 <= s <= 5.0 for s in scores)
    assert all(len(p.split(".")[1]) == 4 for _, p in rows)

    # Predict each example's token count / 10: the file must pair every
    # index with the count of the example that has that idx.
    def by_length(predictor, split, batch_size, buckets=()):
      del predictor, batch_size, buckets
      return split.lengths.astype(np.float32) / 10

    monkeypatch.setattr(predict, "predict_split", by_length)
    predict.predict_run(workdir, str(tmp_path / "lengths"))
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  expected = {}
  for r in rows_in_order:
    ids = tokenizer(r["sentence1"], r["sentence2"], truncation=True,
                    max_length=32)["input_ids"]
    expected[r["idx"]] = glue.format_score(np.float32(len(ids)) / 10)
  assert len(set(expected.values())) == 9  # Distinct: a swap would show.
  _, rows = _read_tsv(tmp_path / "lengths" / "STS-B.tsv")
  assert {int(i): p for i, p in rows} == expected


def test_predict_refuses_a_run_without_glue_data(tmp_path):
  (tmp_path / "config.json").write_text(
      '{"data": {"source": "local", "name": ""}, "num_labels": 2}')
  with pytest.raises(ValueError, match="not a GLUE run.*GLUE tasks: cola, "
                     "sst2"):
    predict.predict_run(str(tmp_path), str(tmp_path / "out"))
