"""The task modules beyond sentence classification, on small built inputs.

Token classification (word -> sub-token label alignment), extractive QA
(answer positions from character offsets, windows with a stride, span
post-processing), masked LM (dynamic masking in the step, exact resume),
their metrics, and each task training end to end through
`train.train_and_evaluate` on a tiny synthetic set.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import data, restore, tasks, train
from research.configs import ConfigError, default, validate
from research.metrics import ner, squad
from research.models import hf
from research.training import tracker
from research.training.checkpointing import Checkpointer
from tests.test_train import _metrics, _restore_latest

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
  return data.load_tokenizer(str(hf.resolve("all-minilm-l6-v2")))


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _config(task, model_dir, train_file, eval_file="", **overrides):
  c = default.get_config()
  c.model.name = str(model_dir)
  c.task = task
  c.data.train_file, c.data.eval_file = train_file, eval_file
  c.wandb.mode = "disabled"
  c.parallelism.mesh_shape = (1, 1, 1)
  c.batch_size = c.eval_batch_size = 16
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 5e-3, 0
  c.log_every_steps = 5
  c.update_from_flattened_dict(overrides)
  return c


def _losses(workdir):
  return [r["train/loss"] for r in tracker.read_jsonl(workdir / "metrics.jsonl")
          if "train/loss" in r]


# --- Token classification -----------------------------------------------------

FIRST, LAST = ["alice", "bob", "carol"], ["smith", "jones"]
CITIES = ["paris", "rome", "berlin"]
OTHER = ["went", "to", "the", "city", "with", "and", "saw", "today"]


def _ner_rows(n, seed):
  """Sentences of names (B-PER [I-PER]), cities (B-LOC) and other words (O)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    words, tags = [], []
    for _ in range(rng.integers(3, 10)):
      r = rng.random()
      if r < 0.2:
        words.append(str(rng.choice(FIRST)))
        tags.append("B-PER")
        if rng.random() < 0.5:
          words.append(str(rng.choice(LAST)))
          tags.append("I-PER")
      elif r < 0.35:
        words.append(str(rng.choice(CITIES)))
        tags.append("B-LOC")
      else:
        words.append(str(rng.choice(OTHER)))
        tags.append("O")
    rows.append({"tokens": words, "tags": tags})
  return rows


def _ner_config(model_dir, tmp_path, **overrides):
  train_file = _jsonl(tmp_path / "train.jsonl", _ner_rows(256, 0))
  eval_file = _jsonl(tmp_path / "dev.jsonl", _ner_rows(64, 1))
  return _config("token_classification", model_dir, train_file, eval_file,
                 num_labels=4, **{"data.text_fields": ("tokens",),
                                  "data.label_field": "tags",
                                  "data.max_length": 32,
                                  "data.buckets": (16, 32),
                                  "metrics": ("accuracy", "entity_f1"),
                                  **overrides})


def test_token_labels_align_to_first_sub_tokens(tokenizer, tmp_path):
  rows = [{"tokens": ["EU", "rejects", "Germanization", "call"],
           "tags": ["B-ORG", "O", "B-MISC", "O"]},
          {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
          {"tokens": "Peter   Blackburn", "tags": "B-PER I-PER"}]  # plain text
  path = _jsonl(tmp_path / "t.jsonl", rows)
  config = _config("token_classification", "unused", path, num_labels=5, **{
      "data.text_fields": ("tokens",), "data.label_field": "tags"})
  train_split, _, names, _ = data.load_splits(config, tokenizer)
  assert names == ("B-MISC", "B-ORG", "B-PER", "I-PER", "O")
  pieces = tokenizer.convert_ids_to_tokens(
      train_split.input_ids[train_split.offsets[0]:train_split.offsets[1]])
  assert pieces == ["[CLS]", "eu", "rejects", "german", "##ization", "call",
                    "[SEP]"]
  first = train_split.labels[train_split.offsets[0]:train_split.offsets[1]]
  # [CLS] and "##ization" are ignored; each word's first piece has its tag.
  assert first.tolist() == [IGNORE, 1, 4, 0, IGNORE, 4, IGNORE]
  for i in (1, 2):
    labels = train_split.labels[train_split.offsets[i]:train_split.offsets[i + 1]]
    assert labels.tolist() == [IGNORE, 2, 3, IGNORE]
  batch = data.Batcher(train_split, 3, (16,), shuffle=False).batch_at(0)
  assert batch["labels"].shape == (3, 16)
  assert (batch["labels"][:, 7:] == IGNORE).all()  # padding is ignored

  # label_all_subtokens: "##ization" gets its word's tag too, B- as I-
  # (a new label): entities stay well formed.
  config.task_options = {"label_all_subtokens": True}
  config.num_labels = 6
  train_split, _, names, _ = data.load_splits(config, tokenizer)
  assert names == ("B-MISC", "B-ORG", "B-PER", "I-MISC", "I-PER", "O")
  assert train_split.labels[:7].tolist() == [IGNORE, 1, 5, 0, 3, 5, IGNORE]


def test_word_lists_read_alike_from_hugging_face_datasets(tokenizer, tmp_path):
  pytest.importorskip("datasets")
  path = _jsonl(tmp_path / "t.jsonl", _ner_rows(20, 3))
  fields = {"data.text_fields": ("tokens",), "data.label_field": "tags"}
  local = _config("token_classification", "unused", path, num_labels=4,
                  **fields)
  hub = _config("token_classification", "unused", path, num_labels=4,
                **fields, **{"data.source": "hf", "data.name": "json",
                             "data.data_dir": str(tmp_path / "hf_cache")})
  a, _, names_a, _ = data.load_splits(local, tokenizer)
  b, _, names_b, _ = data.load_splits(hub, tokenizer)
  assert names_a == names_b == ("B-LOC", "B-PER", "I-PER", "O")
  for key in ("input_ids", "labels"):
    np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


def test_tfds_conll_tags_are_class_label_names(tokenizer):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _config("token_classification", "unused", "", num_labels=9, **{
      "data.source": "tfds", "data.name": "conll2003",
      "data.eval_splits": (), "data.text_fields": ("tokens",),
      "data.label_field": "ner", "data.max_length": 64})
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rows = [(["Peter", "Blackburn", "visited", "Rome"], [1, 2, 0, 5]),
          (["EU", "rejects", "it"], [3, 0, 0])]

  def as_dataset(self, split, **kwargs):
    del self, split, kwargs

    def examples():
      for words, tags in rows:
        yield {"tokens": words, "ner": tags, "pos": [0] * len(tags),
               "chunks": [0] * len(tags)}

    spec = lambda dtype: tf.TensorSpec([None], dtype)  # pylint: disable=unnecessary-lambda-assignment
    return tf.data.Dataset.from_generator(examples, output_signature={
        "tokens": spec(tf.string), "ner": spec(tf.int64),
        "pos": spec(tf.int64), "chunks": spec(tf.int64)})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    train_split, _, names, _ = data.load_splits(config, tokenizer)
  # The ClassLabel's names, in id order, name the tags.
  assert names == tuple(tfds.builder("conll2003").info.features["ner"]
                        .feature.names)
  assert names[:6] == ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC")
  first = train_split.labels[train_split.offsets[0]:train_split.offsets[1]]
  assert first[first != IGNORE].tolist() == [1, 2, 0, 5]
  assert len(train_split) == 2


def test_bad_token_rows_name_file_and_line(tokenizer, tmp_path):
  rows = [{"tokens": ["a", "b"], "tags": ["O", "O"]},
          {"tokens": ["a", "b"], "tags": ["O"]},
          {"tokens": ["c"], "tags": ["B-XYZ"]}]
  path = _jsonl(tmp_path / "t.jsonl", rows)
  config = _config("token_classification", "unused", path, num_labels=2, **{
      "data.text_fields": ("tokens",), "data.label_field": "tags",
      "data.label_names": ("O", "B-PER")})
  with pytest.raises(data.DataError, match=r"t\.jsonl, line 2: 2 words but "
                     r"labels \[\"O\"\]"):
    data.load_splits(config, tokenizer)
  config.data.bad_rows = "skip"
  train_split, _, _, skipped = data.load_splits(config, tokenizer)
  assert skipped == {"train": {"label count": 1, "unknown label": 1}}
  assert list(train_split.rows) == [1]


def test_entity_scores_count_chunks_as_conlleval():
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
  pred = [["B-PER", "I-PER", "O", "B-PER"], ["O", "B-ORG", "I-ORG", "O"]]
  # Gold chunks: PER(0-1), LOC(3), ORG(1-3); predicted: PER(0-1), PER(3),
  # ORG(1-2): one of three correct.
  scores = ner.entity_scores(gold, pred)
  assert scores["precision"] == pytest.approx(1 / 3)
  assert scores["recall"] == pytest.approx(1 / 3)
  assert scores["f1"] == pytest.approx(1 / 3)


def test_token_classification_trains_end_to_end(tmp_path, tiny_model_dir):
  config = _ner_config(tiny_model_dir, tmp_path, total_steps=40,
                       eval_every_steps=40, eval_batch_size=4,
                       **{"data.buckets": (8, 16, 32)})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = _losses(tmp_path / "run")
  assert losses[-1] < 0.3 * losses[0]
  dev = [json.loads(line) for line in (tmp_path / "dev.jsonl").open()]
  tags = [t for r in dev for t in r["tags"]]
  majority = max(tags.count(t) for t in set(tags)) / len(tags)
  assert majority < 0.7
  assert summary["eval/accuracy"] > majority + 0.2
  assert summary["eval/entity_f1"] > 0.8
  # Per-example predictions over evaluation batches of different widths.
  run = train.build(config)
  restored = restore.restore_run(str(tmp_path / "run"))
  evaluator = run.evaluators["validation"]
  widths = {b["input_ids"].shape[1] for b in evaluator.batcher.eval_batches()}
  assert len(widths) > 1
  out = evaluator.predict(restored.params, restored.frozen)
  # One tag per word (not per sub-token), the words as read.
  assert out["words"] == [r["tokens"] for r in dev]
  assert [len(t) for t in out["tags"]] == [len(r["tags"]) for r in dev]
  predicted = np.concatenate(out["tags"])
  assert np.mean(predicted == np.asarray(tags)) == pytest.approx(
      summary["eval/accuracy"])


# --- Question answering -------------------------------------------------------

ITEMS = ["apple", "car", "house", "boat", "shirt"]
COLORS = ["red", "blue", "green", "yellow"]
FILL = ["we", "saw", "a", "nice", "day", "and", "then", "it", "rained", "so"]


def _qa_rows(n, seed):
  """"what color is the X?" answered by the word after "the X is"."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    item, color = str(rng.choice(ITEMS)), str(rng.choice(COLORS))
    before = " ".join(rng.choice(FILL, rng.integers(2, 20)))
    after = " ".join(rng.choice(FILL, rng.integers(2, 20)))
    context = f"{before} the {item} is {color} {after}"
    start = len(before) + len(f" the {item} is ")
    rows.append({"question": f"what color is the {item}?", "context": context,
                 "answers": {"text": [color], "answer_start": [start]}})
  return rows


def _qa_config(model_dir, train_file, eval_file="", **overrides):
  return _config("question_answering", model_dir, train_file, eval_file, **{
      "data.text_fields": ("question", "context"),
      "data.label_field": "answers", "data.max_length": 32,
      "data.buckets": (32,), "metrics": ("exact_match", "f1"),
      "eval_metric": "f1", "task_options": {"doc_stride": 8}, **overrides})


def test_answer_positions_from_offsets_in_strided_windows(tokenizer, tmp_path):
  context = (" ".join(f"word{i}" for i in range(40)) +
             " The capital of France is Paris. " +
             " ".join(f"filler{i}" for i in range(30)))
  rows = [{"question": "What is the capital of France?", "context": context,
           "answers": {"text": ["Paris"],
                       "answer_start": [context.index("Paris")]}},
          {"question": "Which?", "context": "a short one",
           "answers": {"text": ["long"], "answer_start": [2]}}]
  config = _qa_config("unused", _jsonl(tmp_path / "qa.jsonl", rows),
                      **{"data.max_length": 64, "data.bad_rows": "skip",
                         "task_options": {"doc_stride": 16}})
  split, _, names, skipped = data.load_splits(config, tokenizer)
  assert names == () and skipped == {"train": {"answer span mismatch": 1}}
  assert len(split) > 2  # one long context, several windows
  assert set(split.arrays["example_index"]) == {0}
  found = 0
  for i in range(len(split)):
    lo, hi = split.offsets[i], split.offsets[i + 1]
    ids = split.input_ids[lo:hi]
    first, last = split.arrays["start_positions"][i], split.arrays["end_positions"][i]
    starts = split.arrays["offset_start"][lo:hi]
    ends = split.arrays["offset_end"][lo:hi]
    assert hi - lo <= 64
    # Question tokens and specials have no context offsets.
    assert (starts[:(split.token_type_ids[lo:hi] == 0).sum()] == -1).all()
    if first == 0:
      assert last == 0  # the answer is not in this window: [CLS]
      continue
    found += 1
    assert tokenizer.decode(ids[first:last + 1]) == "paris"
    assert context[starts[first]:ends[last]] == "Paris"
  assert found >= 2  # the stride repeats the answer in overlapping windows
  # Consecutive windows share doc_stride context tokens.
  a = split.arrays["offset_start"][split.offsets[0]:split.offsets[1]]
  b = split.arrays["offset_start"][split.offsets[1]:split.offsets[2]]
  shared = set(a[a >= 0].tolist()) & set(b[b >= 0].tolist())
  assert len(shared) == 16


def test_squad_metrics_normalise_as_the_official_script():
  assert squad.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
  assert squad.exact_match("the Paris", "Paris") == 1
  assert squad.exact_match("Paris France", "Paris") == 0
  # 1 shared word of 2 predicted and 1 gold: P 1/2, R 1, F1 2/3.
  assert squad.f1("Paris France", "Paris") == pytest.approx(2 / 3)


def test_question_answering_trains_end_to_end(tmp_path, tiny_model_dir):
  config = _qa_config(
      tiny_model_dir, _jsonl(tmp_path / "train.jsonl", _qa_rows(256, 0)),
      _jsonl(tmp_path / "dev.jsonl", _qa_rows(64, 1)), total_steps=80,
      eval_every_steps=80)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = _losses(tmp_path / "run")
  assert losses[-1] < 0.2 * losses[0]
  # Chance: one of ~30 context tokens; a colour word at random: 0.25.
  assert summary["eval/exact_match"] > 0.8 and summary["eval/f1"] > 0.8
  run = train.build(config)  # its evaluator, on the trained parameters
  restored = restore.restore_run(str(tmp_path / "run"))
  answers = run.evaluators["validation"].predict(restored.params,
                                                 restored.frozen)["answers"]
  gold = [r["answers"]["text"][0] for r in _qa_rows(64, 1)]
  assert np.mean([a == g for a, g in zip(answers, gold)]) == \
      summary["eval/exact_match"]


# --- Masked language modelling ---------------------------------------------------


def _mlm_config(model_dir, tmp_path, **overrides):
  texts = [" ".join(r["tokens"]) for r in _ner_rows(200, 2)]
  path = tmp_path / "texts.tsv"
  path.write_text("sentence\n" + "\n".join(texts) + "\n")
  return _config("masked_lm", model_dir, str(path), str(path), **{
      "data.max_length": 32, "data.buckets": (16, 32),
      "metrics": ("accuracy",), **overrides})


def test_masking_picks_real_tokens_80_10_10(tokenizer, tmp_path):
  config = _mlm_config("unused", tmp_path)
  task = tasks.load(config, tokenizer)
  ids = np.asarray(tokenizer(["alice went to the city"] * 4000, padding="max_length",
                             max_length=12)["input_ids"], np.int32)
  batch = {"input_ids": jnp.asarray(ids),
           "attention_mask": jnp.asarray((ids != 0).astype(np.int32))}
  out = task.transform(batch, jax.random.key(0))
  again = task.transform(batch, jax.random.key(0))
  np.testing.assert_array_equal(out["input_ids"], again["input_ids"])
  labels, new = np.asarray(out["labels"]), np.asarray(out["input_ids"])
  chosen = labels != IGNORE
  special = np.isin(ids, tokenizer.all_special_ids)
  assert not (chosen & special).any() and not (chosen & (ids == 0)).any()
  np.testing.assert_array_equal(labels[chosen], ids[chosen])
  real = (~special).sum()
  assert abs(chosen.sum() / real - 0.15) < 0.01
  masked = (new == tokenizer.mask_token_id) & chosen
  kept = (new == ids) & chosen
  assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
  assert abs(kept.sum() / chosen.sum() - 0.1) < 0.02  # (+ random hits: rare)
  np.testing.assert_array_equal(new[~chosen], ids[~chosen])
  other = task.transform(batch, jax.random.key(1))
  assert (np.asarray(other["labels"]) != labels).any()


@pytest.mark.slow
def test_masked_lm_trains_and_resumes_exactly(tmp_path, tiny_model_dir,
                                             monkeypatch):
  config = _mlm_config(tiny_model_dir, tmp_path, total_steps=16,
                       eval_every_steps=8, log_every_steps=1,
                       **{"optimizer.learning_rate": 2e-2})
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  summary = train.train_and_evaluate(config, str(straight))
  losses = _losses(straight)
  # From ~ln(30522) = 10.3 nats (uniform over the vocabulary) down: at
  # least 2 nats (7x lower perplexity) on this tiny vocabulary of words.
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 2.0
  assert summary["eval/perplexity"] == pytest.approx(
      np.exp(summary["eval/loss"]), rel=1e-6)
  assert 0.0 <= summary["eval/accuracy"] <= 1.0

  # Stop at step 5 (between evaluations), then resume: the masks, like the
  # dropout, are functions of (seed, step).
  real = Checkpointer.reached_preemption
  monkeypatch.setattr(Checkpointer, "reached_preemption",
                      lambda self, step: step == 5 or real(self, step))
  with pytest.raises(train.Preempted, match="saved step 5"):
    train.train_and_evaluate(config, str(resumed))
  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  train.train_and_evaluate(config, str(resumed))
  step_a, state_a, _ = _restore_latest(str(straight))
  step_b, state_b, _ = _restore_latest(str(resumed))
  assert step_a == step_b == 16
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _metrics(straight) == _metrics(resumed)


def test_task_options_are_checked_by_the_task(tmp_path):
  config = _qa_config("unused", "x.jsonl", "dev.jsonl")
  config.task_options = {"doc_strid": 8}
  with pytest.raises(ConfigError, match="config.task_options.doc_strid is not "
                     "an option of task 'question_answering'; did you mean "
                     "config.task_options.doc_stride"):
    validate(config)
  config.task_options = {"doc_stride": 20}
  with pytest.raises(ConfigError, match="doc_stride=20 must be in"):
    validate(config)
  config.task_options = {}
  config.metrics = ("accuracy",)
  with pytest.raises(ConfigError, match="metric 'accuracy' of the span "
                     "evaluator is not known; valid: exact_match, f1"):
    validate(config)


def test_sparse_prediction_refuses_next_sentence(tokenizer, tmp_path):
  config = _mlm_config("unused", tmp_path)
  config.task_options = {"sparse_prediction": True, "next_sentence": True,
                         "corpus": "text", "train_files": ("x",)}
  with pytest.raises(ConfigError, match="sparse_prediction works without "
                     "next_sentence"):
    tasks.load(config, tokenizer)
