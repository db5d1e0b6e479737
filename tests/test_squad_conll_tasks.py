"""SQuAD JSON and CoNLL files through the training core, end to end.

Question answering on official SQuAD v2.0 JSON and NER on CoNLL column
files, each read by its task through the config, trained on the tiny BERT
and written out by `research.predict`; the predictions scored again from
the written files (official SQuAD logic, seqeval); the exported models in
transformers giving the same answers (BertForQuestionAnswering; transformers
5 has no question-answering pipeline) and entities (the token-classification
pipeline); every window
of a 1,000-token context seen; exact resume after SIGKILL; bad input named
by file and line (or question id).
"""

import json
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import squad_v2
from research import data, parallelism, predict, restore, train
from research.data import conll
from research.metrics import ner, squad
from research.evaluators import span
from research.export import export_run
from tests import test_reliability as reliability
from tests.test_tasks import FILL, ITEMS, _ner_rows, _qa_rows
from tests.test_train import _metrics

# --- Data built for the tests ----------------------------------------------------


def _squad_json(path, n, seed):
  """test_tasks' "what color is the X?" rows as official SQuAD v2.0 JSON;
  every 4th question asks about an item its context does not mention."""
  paragraphs = []
  for i, row in enumerate(_qa_rows(n, seed)):
    answers = [{"text": row["answers"]["text"][0],
                "answer_start": row["answers"]["answer_start"][0]}]
    question = row["question"]
    if i % 4 == 3:
      other = next(x for x in ITEMS if f"the {x} is" not in row["context"])
      question, answers = f"what color is the {other}?", []
    paragraphs.append({"context": row["context"], "qas": [{
        "id": f"q{seed}-{i}", "question": question, "answers": answers,
        "is_impossible": not answers}]})
  path.write_text(json.dumps({"version": "v2.0", "data": [
      {"title": "colours", "paragraphs": paragraphs}]}))
  return str(path)


def _conll_file(path, rows):
  """CoNLL-2003 layout: -DOCSTART-, `word POS chunk tag`, blank lines."""
  lines = ["-DOCSTART- -X- -X- O", ""]
  for row in rows:
    lines += [f"{w} NN I-NP {t}" for w, t in zip(row["tokens"], row["tags"])]
    lines.append("")
  path.write_text("\n".join(lines) + "\n")
  return str(path)


SQUAD_ARG = ("model=all-minilm-l6-v2,source=local,train_file={train},"
             "eval_file={dev},max_length=64,doc_stride=16")
# The shared QA run (in process, and the same through the CLI).
QA_OVERRIDES = {"total_steps": 60, "eval_every_steps": 20,
                "checkpoint_every_steps": 10, "log_every_steps": 5,
                "batch_size": 16, "eval_batch_size": 16,
                "optimizer.learning_rate": 5e-3, "optimizer.warmup_steps": 0,
                "data.buckets": (64,), "wandb.mode": "disabled",
                "parallelism.mesh_shape": (1, 1, 1)}


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("squad")
  return (_squad_json(root / "train.json", 320, 0),
          _squad_json(root / "dev.json", 64, 1))


def _squad_config(model_dir, files):
  config = squad_v2.get_config(SQUAD_ARG.format(train=files[0],
                                                dev=files[1]))
  config.model.name = str(model_dir)
  config.update_from_flattened_dict(QA_OVERRIDES)
  return config


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_model_dir, squad_files):
  """The shared QA run, straight through: (workdir, summary)."""
  workdir = tmp_path_factory.mktemp("qa_run")
  summary = train.train_and_evaluate(
      _squad_config(tiny_model_dir, squad_files), str(workdir))
  return workdir, summary


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tiny_model_dir):
  """NER on CoNLL files (.txt: read as CoNLL): (workdir, summary, dev)."""
  root = tmp_path_factory.mktemp("ner")
  train_rows, dev_rows = _ner_rows(256, 0), _ner_rows(64, 1)
  from experiments import conll2003  # pylint: disable=import-outside-toplevel
  config = conll2003.get_config(
      "model=all-minilm-l6-v2,source=local,"
      f"train_file={_conll_file(root / 'train.txt', train_rows)},"
      f"eval_file={_conll_file(root / 'dev.txt', dev_rows)}")
  config.model.name = str(tiny_model_dir)
  config.data.label_names = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
  config.num_labels = 5
  config.data.max_length, config.data.buckets = 32, (16, 32)
  config.update_from_flattened_dict({
      "total_steps": 40, "eval_every_steps": 40, "batch_size": 16,
      "eval_batch_size": 8, "optimizer.learning_rate": 5e-3,
      "optimizer.warmup_steps": 0, "wandb.mode": "disabled",
      "parallelism.mesh_shape": (1, 1, 1), "model.hidden_dropout": 0.0,
      "model.attention_dropout": 0.0})
  workdir = root / "run"
  return workdir, train.train_and_evaluate(config, str(workdir)), dev_rows


# --- Question answering ------------------------------------------------------------


def test_squad_json_trains_and_predict_writes_official_files(qa_run,
                                                             squad_files,
                                                             tmp_path):
  workdir, summary = qa_run
  # Chance: ~1/30 tokens; "always no answer" scores the NoAns share, 0.25.
  assert summary["eval/best_f1"] > 0.7, summary
  assert summary["eval/has_ans_f1"] > 0.6, summary
  written = predict.write_run(str(workdir), str(tmp_path / "out"))
  files = written["validation"]
  # The files score as the official script does; the threshold chosen on
  # this (dev) split gives its best F1.
  rescored = squad.evaluate_files(squad_files[1], files["predictions"],
                                  files["null_odds"], files["null_threshold"])
  assert rescored["f1"] / 100 == pytest.approx(files["best_f1"])
  assert rescored["f1"] / 100 == pytest.approx(summary["eval/best_f1"])
  predictions = json.loads((tmp_path / "out/validation/predictions.json")
                           .read_text())
  assert len(predictions) == 64 and all(k.startswith("q1-") for k in
                                        predictions)
  # Unlabeled data (no answers in the file) gets the run's dev threshold.
  doc = json.loads(open(squad_files[1]).read())
  for p in doc["data"][0]["paragraphs"]:
    for qa in p["qas"]:
      qa.update(answers=[], is_impossible=False)
  unlabeled = tmp_path / "test.jsonl"
  unlabeled.write_text("".join(
      json.dumps({"question": qa["question"], "context": p["context"]}) + "\n"
      for p in doc["data"][0]["paragraphs"] for qa in p["qas"]))
  out = predict.write_run(str(workdir), str(tmp_path / "test_out"),
                          eval_file=str(unlabeled))["validation"]
  assert out["null_threshold"] == pytest.approx(
      summary["eval/best_null_threshold"])


def test_answer_in_last_window_of_1000_token_context_is_found(tiny_model_dir,
                                                             tmp_path):
  """The task's windows cover the whole context: with logits that point at
  each window's training target, the span evaluator finds the answer that
  only the last window of a 1,000+ token context holds."""
  rng = np.random.default_rng(0)
  context = " ".join(rng.choice(FILL, 1000)) + " the capital is Paris ."
  row = {"question": "what is the capital?", "context": context,
         "answers": {"text": ["Paris"],
                     "answer_start": [context.index("Paris")]}}
  path = tmp_path / "long.jsonl"
  path.write_text(json.dumps(row) + "\n")
  config = squad_v2.get_config(SQUAD_ARG.format(train=path, dev=path))
  config.data.source, config.data.format = "local", "jsonl"
  config.data.max_length = 384
  config.task_options.doc_stride = 128
  config.task_options.version_2 = False
  config.model.name = str(tiny_model_dir)
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  assert len(tokenizer(context)["input_ids"]) > 1000
  _, evals, _, _ = data.load_splits(config, tokenizer)
  split = evals["validation"]
  starts = split.arrays["start_positions"]
  assert len(split) >= 4 and (starts[:-1] == 0).all() and starts[-1] > 0

  def oracle_step(params, frozen, batch, index):
    """A model that scores each window's target position (CLS: none)."""
    del params, frozen, index
    pos = np.arange(batch["input_ids"].shape[1])
    hot = lambda key: np.where(  # pylint: disable=unnecessary-lambda-assignment
        pos[None] == np.asarray(batch[key])[:, None], 10.0, 0.0)
    weights = np.asarray(batch["weights"])
    return {"loss": np.float32(0), "weight": weights.sum(),
            "predictions": {"start_logits": hot("start_positions"),
                            "end_logits": hot("end_positions"),
                            **{k: np.asarray(batch[k]) for k in (
                                "example_index", "cls_index", "offset_start",
                                "offset_end")}},
            "weights": weights, "batch_weights": weights,
            "lengths": np.asarray(batch["attention_mask"]).sum(-1)}

  mesh = parallelism.make_mesh(config.parallelism, jax.devices()[:1])
  evaluator = span.Evaluator(
      name="dev", task=_task(config, tokenizer), split=split,
      batcher=data.Batcher(split, 2, (384,), shuffle=False),
      make_step=lambda logits: oracle_step,
      sharding=parallelism.batch_sharding(mesh), config=config)
  assert evaluator.predict(None, None)["answers"] == ["Paris"]
  assert evaluator.run(None, None)["exact_match"] == 1.0


def _task(config, tokenizer):
  from research import tasks  # pylint: disable=import-outside-toplevel
  return tasks.load(config, tokenizer)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_qa_exactly(qa_run, tiny_model_dir,
                                               squad_files, tmp_path,
                                               compilation_cache):
  """Killed after checkpoint 10, the same command ends where the straight
  run did: parameters, optimiser state and metrics equal."""
  workdir, log_path = tmp_path / "run", tmp_path / "killed.log"
  args = [
      sys.executable, "-m", "research.train", "--config",
      "experiments/squad_v2.py:" + SQUAD_ARG.format(train=squad_files[0],
                                                    dev=squad_files[1]),
      f"--config.model.name={tiny_model_dir}",
      *[f"--config.{k}={v}" for k, v in QA_OVERRIDES.items()],
      f"--workdir={workdir}"]
  cache = compilation_cache  # the session's (conftest.py)
  proc = reliability._kill_after_checkpoint(args, cache, workdir, log_path,
                                            10)
  assert proc.returncode == -signal.SIGKILL
  resume_from = reliability._steps_on_disk(workdir)[-1]
  assert 10 <= resume_from < 60
  out = subprocess.run(args, cwd=reliability.REPO, env=reliability._env(cache),
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step {resume_from}" in out.stderr
  step_a, state_a, extras_a = reliability._restore(qa_run[0])
  step_b, state_b, extras_b = reliability._restore(workdir)
  assert step_a == step_b == 60 and extras_a == extras_b
  reliability._assert_trees_equal(state_a, state_b)
  assert _metrics(qa_run[0]) == _metrics(workdir)


def test_bad_squad_input_names_file_and_question(tiny_model_dir, squad_files,
                                                 tmp_path):
  doc = json.loads(open(squad_files[1]).read())
  qa = doc["data"][0]["paragraphs"][2]["qas"][0]
  qa["answers"][0]["answer_start"] = 10_000  # outside its context
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(doc))
  config = _squad_config(tiny_model_dir, (squad_files[0], str(path)))
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  with pytest.raises(data.DataError, match=r"bad\.json, question q1-2: "
                     r"answer '\w+' at answer_start 10000 lies outside the "
                     r"context"):
    data.load_splits(config, tokenizer)
  # The same in JSON lines: named by file and line.
  rows = [{"question": "q?", "context": "a red car", "answers": {
      "text": ["red"], "answer_start": [2]}},
          {"question": "q?", "context": "a red car", "answers": {
              "text": ["blue"], "answer_start": [40]}}]
  path = tmp_path / "bad.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config.data.eval_file, config.data.format = str(path), "auto"
  with pytest.raises(data.DataError, match=r"bad\.jsonl, line 2: answer "
                     "'blue' at answer_start 40 lies outside the context"):
    data.load_splits(config, tokenizer)


# --- NER ------------------------------------------------------------------------------


def test_conll_files_train_and_predict_writes_words(ner_run, tmp_path):
  workdir, summary, dev = ner_run
  assert summary["eval/entity_f1"] > 0.8
  out = predict.write_run(str(workdir), str(tmp_path / "out"))["validation"]
  # One line per word (not per sub-token): token, gold, predicted.
  lines = [l.split() for l in open(out["predictions"], encoding="utf-8")]
  words = [l for l in lines if l]
  assert [w[0] for w in words] == [t for r in dev for t in r["tokens"]]
  assert [w[1] for w in words] == [t for r in dev for t in r["tags"]]
  got = conll.read_conll(out["predictions"])  # the last column: predicted
  assert got.tokens == [r["tokens"] for r in dev]
  scores = ner.entity_scores([r["tags"] for r in dev], got.tags)
  assert scores["f1"] == pytest.approx(summary["eval/entity_f1"])


@pytest.mark.parametrize("line, message", [
    ("Rome NN I-NP B-CITY", r"dev\.txt, line 4: tag 'B-CITY' is not in the "
                            r"tag set"),
    ("Rome NN B-LOC", r"dev\.txt, line 4: 3 column\(s\) where 4 like the "
                      r"file's first token line are expected"),
    ("Rome", r"dev\.txt, line 4: 1 column\(s\) where at least 2"),
])
def test_bad_conll_line_is_named_by_file_and_line(tiny_model_dir, tmp_path,
                                                  line, message):
  from experiments import conll2003  # pylint: disable=import-outside-toplevel
  good = _conll_file(tmp_path / "train.txt", _ner_rows(4, 0))
  bad = tmp_path / "dev.txt"
  bad.write_text("-DOCSTART- -X- -X- O\n\nvisit VB I-VP O\n" + line + "\n\n")
  config = conll2003.get_config("model=all-minilm-l6-v2,source=local,"
                                f"train_file={good},eval_file={bad}")
  config.model.name = str(tiny_model_dir)
  with pytest.raises(data.DataError, match=message):
    data.load_splits(config, data.load_tokenizer(str(tiny_model_dir)))


# --- Export: transformers' pipelines agree with our post-processing -------------------


def test_exported_models_in_transformers_agree(qa_run, ner_run, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  # Question answering: the best span of each question (one window each;
  # the pipeline ranks windows by probability, BERT's code by logits).
  workdir = str(qa_run[0])
  restored = restore.restore_run(workdir)
  config = restored.config
  tokenizer = data.load_tokenizer(config.model.name)
  _, splits, _, _ = data.load_splits(config, tokenizer, task=restored.task)
  split = splits["validation"]
  assert len(split) == len(split.examples["id"])  # one window per question
  evaluator = restored.make_evaluator(split, 16, (64,), cls=span.Evaluator,
                                      n_best=64)
  decoded, _ = evaluator.decode(restored.params, restored.frozen)
  # transformers 5 removed the question-answering pipeline: the exported
  # model runs in transformers' BertForQuestionAnswering (PyTorch) and the
  # pipeline's decoding rule is written out: every (start, end) pair of
  # context tokens with end - start < 30, the best start + end logit.
  import torch  # pylint: disable=import-outside-toplevel
  hf_dir = export_run(workdir, str(tmp_path / "qa"))
  model = transformers.AutoModelForQuestionAnswering.from_pretrained(hf_dir)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  doc = json.loads(open(config.data.eval_file).read())
  for p in doc["data"][0]["paragraphs"]:
    for q in p["qas"]:
      enc = hf_tokenizer(q["question"], p["context"], truncation="only_second",
                         max_length=64, return_offsets_mapping=True,
                         return_tensors="pt")
      offsets = enc.pop("offset_mapping")[0].numpy()
      context = np.asarray([s == 1 for s in enc.sequence_ids(0)])
      with torch.no_grad():
        out = model(**enc)
      start, end = (x[0].numpy() for x in (out.start_logits, out.end_logits))
      score = start[:, None] + end[None, :]
      pos = np.arange(len(start))
      ok = (context[:, None] & context[None, :] & (pos[None] >= pos[:, None])
            & (pos[None] - pos[:, None] < 30))
      s, e = np.unravel_index(np.argmax(np.where(ok, score, -np.inf)),
                              score.shape)
      assert p["context"][offsets[s][0]:offsets[e][1]] == \
          decoded.predictions[q["id"]]
  # NER: entities of our word tags = the pipeline's "first" aggregation
  # (a word's tag is its first sub-token's), O dropped.
  workdir, _, dev = ner_run
  out = predict.write_run(str(workdir), str(tmp_path / "ner"))["validation"]
  ours = conll.read_conll(out["predictions"]).tags
  tagger = transformers.pipeline(
      "token-classification", model=export_run(str(workdir),
                                               str(tmp_path / "ner_hf")),
      aggregation_strategy="first", device="cpu")
  found = 0
  for row, tags in zip(dev, ours):
    text = " ".join(row["tokens"])
    starts = np.cumsum([0] + [len(w) + 1 for w in row["tokens"]])[:-1]
    theirs = sorted((e["entity_group"], int(np.searchsorted(starts, e["start"],
                                                            "right") - 1),
                     int(np.searchsorted(starts, e["end"] - 1, "right") - 1))
                    for e in tagger(text))
    assert theirs == sorted(ner.entities(tags)), text
    found += len(theirs)
  assert found > 20
