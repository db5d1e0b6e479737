"""research.serve's HTTP API in-process (FastAPI TestClient), every head.

The served answers are checked against the run's own evaluators (the same
restored model, `research.restore.Restored.make_evaluator`), explanations against
their defining properties (integrated gradients' completeness, SHAP's
efficiency), the batcher against retracing, and bad input against 4xx
answers that say what was wrong.
"""

import concurrent.futures
import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (pip install "
                    "'research-bert[serve]') is not installed")

from fastapi.testclient import TestClient  # pylint: disable=wrong-import-position
from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=wrong-import-position

from research import data, evaluators, restore  # pylint: disable=wrong-import-position
from research.models import hf  # pylint: disable=wrong-import-position
from research.serve import app as app_lib  # pylint: disable=wrong-import-position
from research.serve import engine as engine_lib  # pylint: disable=wrong-import-position
from research.serve import store as store_lib  # pylint: disable=wrong-import-position
from research.tasks.common import softmax  # pylint: disable=wrong-import-position

LIMITS = engine_lib.Limits(max_inputs=8, max_chars=5000,
                           max_body_bytes=2 << 20, explain_samples=60,
                           max_explain_samples=100, ig_steps=16)
BATCHING = engine_lib.Batching(max_batch=4, batch_sizes=(1, 4))


@pytest.fixture(scope="module")
def engines(serve_runs, compilation_cache):
  del compilation_cache
  out = {task: engine_lib.load(workdir, limits=LIMITS,
                               batching_options=BATCHING)
         for task, workdir in serve_runs.items()}
  for engine in out.values():
    engine.start(block=True)
  yield out
  for engine in out.values():
    engine.close()


@pytest.fixture(scope="module")
def clients(engines, tmp_path_factory):
  root = tmp_path_factory.mktemp("feedback")
  out = {}
  for task, engine in engines.items():
    store = store_lib.FeedbackStore.open(f"sqlite:///{root}/{task}.db")
    out[task] = TestClient(app_lib.create_app(engine, store))
    out[task].store = store
  yield out
  for client in out.values():
    client.store.close()


def _evaluated(workdir):
  """(split, the first evaluator's predict()) of a run on its eval split."""
  config = restore.read_config(workdir)
  tokenizer = data.load_tokenizer(str(hf.resolve(config.model.name)))
  restored = restore.restore_run(workdir, "best", tokenizer)
  config.data.train_split, config.data.train_file = "", ""
  _, splits, _, _ = data.load_splits(
      config, tokenizer, cache_dir=f"{workdir}/cache",
      label_names=data.load_label_names(f"{workdir}/labels.json"),
      task=restored.task)
  name, ecfg = next(iter(evaluators.configs(config, restored.task).items()))
  options = evaluators.options(name, ecfg)
  split = splits[options.pop("split")]
  cls = evaluators.module(ecfg["type"], name).Evaluator
  evaluator = restored.make_evaluator(
      split, 8, tuple(config.data.buckets), name=name, cls=cls, **options)
  return split, evaluator.predict(restored.params, restored.frozen)


def _rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _predict(client, inputs, status=200):
  response = client.post("/predict", json={"inputs": inputs})
  assert response.status_code == status, response.text
  return response.json()


# --- /predict, every head, against the run's evaluators ------------------------


def test_sequence_classification_answers_as_the_evaluator(clients, engines,
                                                         serve_runs):
  from tests.serve_runs import REVIEWS  # pylint: disable=import-outside-toplevel
  _, evaluated = _evaluated(serve_runs["sequence_classification"])
  engine = engines["sequence_classification"]
  texts = [t for t, _ in REVIEWS * 4]
  answers = []
  for first in range(0, len(texts), 8):
    answers += _predict(clients["sequence_classification"],
                        [{"text": t} for t in texts[first:first + 8]]
                        )["predictions"]
  assert [a["label_id"] for a in answers] == \
      evaluated["predictions"].tolist()
  probabilities = np.asarray([[a["probabilities"]["negative"],
                               a["probabilities"]["positive"]]
                              for a in answers])
  # The model itself, one unpadded text at a time.
  for text, p in zip(texts[:6], probabilities):
    ids = np.asarray([engine.tokenizer(text)["input_ids"]], np.int32)
    logits = engine.model(ids, np.ones_like(ids), np.zeros_like(ids))
    np.testing.assert_allclose(p, softmax(np.asarray(logits)[0]), atol=1e-5)
  assert all(not a["truncated"] and len(a["id"]) == 32 for a in answers)


def test_token_classification_tags_words_as_the_evaluator(clients,
                                                          serve_runs):
  workdir = serve_runs["token_classification"]
  _, evaluated = _evaluated(workdir)
  sentences = [r["tokens"] for r in _rows(f"{workdir}/../ner.jsonl")][:8]
  by_words = _predict(clients["token_classification"],
                      [{"words": w} for w in sentences])["predictions"]
  assert [[w["tag"] for w in a["words"]] for a in by_words] == \
      [list(t) for t in evaluated["tags"][:8]]
  # The same sentences as raw text: the same words, tags and entities, with
  # their character offsets in the text.
  texts = [" ".join(w) for w in sentences]
  by_text = _predict(clients["token_classification"],
                     [{"text": t} for t in texts])["predictions"]
  from research.metrics import ner  # pylint: disable=import-outside-toplevel
  for text, a, b in zip(texts, by_words, by_text):
    assert [w["tag"] for w in a["words"]] == [w["tag"] for w in b["words"]]
    tags = [w["tag"] for w in b["words"]]
    assert [(e["type"]) for e in b["entities"]] == \
        [kind for kind, _, _ in ner.entities(tags)]
    for e in b["entities"]:
      assert text[e["start"]:e["end"]] == e["text"]
    for w in b["words"]:
      assert text[w["start"]:w["end"]] == w["word"]


def test_question_answering_answers_as_the_span_evaluator(clients,
                                                          serve_runs):
  workdir = serve_runs["question_answering"]
  _, evaluated = _evaluated(workdir)
  rows = _rows(f"{workdir}/../qa.jsonl")[:8]
  answers = _predict(clients["question_answering"], [
      {"question": r["question"], "context": r["context"]} for r in rows
  ])["predictions"]
  assert [a["answer"] for a in answers] == evaluated["answers"][:8]
  for row, a in zip(rows, answers):
    assert row["context"][a["start"]:a["end"]] == a["answer"]
    assert 0 < a["score"] <= 1


def test_masked_lm_fills_are_the_models_most_likely_tokens(clients, engines):
  engine = engines["masked_lm"]
  answer = _predict(clients["masked_lm"], [
      {"text": "a warm [MASK] film, [MASK] moving", "top_k": 3}
  ])["predictions"][0]
  enc = engine.tokenizer("a warm [MASK] film, [MASK] moving")
  ids = np.asarray([enc["input_ids"]], np.int32)
  logits = np.asarray(engine.model(ids, np.ones_like(ids), np.zeros_like(ids)))
  positions = np.flatnonzero(ids[0] == engine.tokenizer.mask_token_id)
  assert [f["position"] for f in answer["fills"]] == positions.tolist()
  for fill, p in zip(answer["fills"], positions):
    probabilities = softmax(logits[0, p])
    top = np.argsort(-probabilities)[:3]
    assert [c["token_id"] for c in fill["candidates"]] == top.tolist()
    np.testing.assert_allclose([c["score"] for c in fill["candidates"]],
                               probabilities[top], rtol=1e-4)


# --- Bad input: 4xx with a message ----------------------------------------------

BAD = [
    ("sequence_classification", {"inputs": [{"text": ""}]}, 422,
     "at least 1 character"),
    ("sequence_classification", {"inputs": [{"text": "   "}]}, 422, "empty"),
    ("sequence_classification", {"inputs": [{"text": 5}]}, 422,
     "valid string"),
    ("sequence_classification", {"inputs": [{"text": "a", "label": 1}]}, 422,
     "Extra inputs are not permitted"),
    ("sequence_classification", {"inputs": [{"text": "a"}], "top": 1}, 422,
     "Extra inputs"),
    ("sequence_classification", {"inputs": [{"text": "a"}] * 9}, 422,
     "at most 8 items"),
    ("sequence_classification", {"inputs": []}, 422, "at least 1 item"),
    ("sequence_classification", {"inputs": "a text"}, 422, "valid list"),
    ("sequence_classification", [1, 2], 422, "valid dictionary"),
    ("sequence_classification", {"inputs": [{"text": "\ud800 x"}]}, 422,
     "unicode string"),
    ("question_answering", {"inputs": [{"question": "why?"}]}, 422,
     "Field required"),
    ("question_answering", {"inputs": [{"question": "why?", "context": " "}]},
     422, "inputs[0].context is empty"),
    ("token_classification", {"inputs": [{"text": "a b", "words": ["a"]}]},
     422, "exactly one of text and words"),
    ("token_classification", {"inputs": [{"words": ["a", " "]}]}, 422,
     "none of them empty (words[1] is)"),
    ("token_classification", {"inputs": [{"words": []}]}, 422,
     "at least 1 item"),
    ("token_classification", {"inputs": [{}]}, 422,
     "give exactly one of text and words"),
    ("masked_lm", {"inputs": [{"text": "no mask here"}]}, 422,
     "String should match pattern '\\\\[MASK\\\\]'"),
    ("masked_lm", {"inputs": [{"text": "a [MASK]", "top_k": 0}]}, 422,
     "greater than or equal to 1"),
    ("masked_lm", {"inputs": [{"text": "a [MASK]", "top_k": "3"}]}, 422,
     "valid integer"),
]


@pytest.mark.parametrize("task,body,status,message", BAD)
def test_bad_input_gets_a_4xx_that_says_why(clients, task, body, status,
                                            message):
  response = clients[task].post("/predict", content=json.dumps(body),
                                headers={"content-type": "application/json"})
  assert response.status_code == status, response.text
  assert message in response.text


def test_bad_bodies_get_400_and_413(clients):
  client = clients["sequence_classification"]
  headers = {"content-type": "application/json"}
  response = client.post("/predict", content=b'{"inputs": [{"text": "\xff"}]}',
                         headers=headers)
  assert response.status_code == 400
  assert "not valid UTF-8: byte 0xff at offset 22" in response.text
  response = client.post("/predict", content=b'{"inputs": [', headers=headers)
  assert response.status_code == 422 and "JSON decode error" in response.text
  big = json.dumps({"inputs": [{"text": "x" * (3 << 20)}]})
  response = client.post("/predict", content=big, headers=headers)
  assert response.status_code == 413 and "max_body_bytes" in response.text


def test_a_megabyte_text_is_cut_and_the_answer_says_so(clients):
  text = "a warm and funny film " * 50_000  # 1.1 MB
  answer = _predict(clients["sequence_classification"],
                    [{"text": text}, {"text": "a warm film"}])["predictions"]
  assert answer[0]["truncated"] and not answer[1]["truncated"]
  assert "cut to its first 5000 of 1100000 characters" in \
      " ".join(answer[0]["notes"])
  assert "data.max_length" in " ".join(answer[0]["notes"])
  # What the model read is the same as the text's first max_length tokens.
  start = _predict(clients["sequence_classification"],
                   [{"text": text[:200]}])["predictions"][0]
  assert answer[0]["label"] == start["label"]
  np.testing.assert_allclose(answer[0]["probabilities"]["positive"],
                             start["probabilities"]["positive"], atol=1e-6)


# --- /explain ----------------------------------------------------------------------


def test_explanations_add_up(clients):
  client = clients["sequence_classification"]
  response = client.post("/explain", json={
      "inputs": [{"text": "a warm, funny and moving film"}], "target":
      "positive"})
  assert response.status_code == 200, response.text
  e = response.json()["explanations"][0]
  assert e["target"] == "positive" and e["target_id"] == 1
  words = [w["word"] for w in e["words"]]
  assert words == ["a", "warm", ",", "funny", "and", "moving", "film"]
  for method in ("integrated_gradients", "shap", "lime"):
    assert len(e["attributions"][method]) == len(words)
  ig = e["integrated_gradients"]
  expected = e["output"] - ig["baseline_output"]
  assert sum(e["attributions"]["integrated_gradients"]) == pytest.approx(
      expected, rel=1e-2)
  assert ig["completeness_error"] <= 1e-2 * abs(expected)
  assert ig["baseline"] == "pad (special tokens kept)"
  # SHAP's efficiency: the values add up to f(x) - f(every word masked).
  assert sum(e["attributions"]["shap"]) == pytest.approx(
      e["output"] - e["shap"]["base_value"], rel=1e-4, abs=1e-7)
  again = client.post("/explain", json={
      "inputs": [{"text": "a warm, funny and moving film"}],
      "target": 1, "methods": ["lime"]}).json()["explanations"][0]
  assert again["attributions"]["lime"] == e["attributions"]["lime"]  # seeded


def test_explain_refuses_what_it_cannot_explain(clients):
  response = clients["token_classification"].post(
      "/explain", json={"inputs": [{"text": "alice went to paris"}]})
  assert response.status_code == 422
  assert "no sequence-level output to explain" in response.text
  response = clients["sequence_classification"].post(
      "/explain", json={"inputs": [{"text": "good"}], "target": "neutral"})
  assert response.status_code == 422
  assert "valid: a label name (negative, positive)" in response.text
  response = clients["sequence_classification"].post(
      "/explain", json={"inputs": [{"text": "good"}], "methods": ["gradcam"]})
  assert response.status_code == 422


# --- Batching: no retrace under load ---------------------------------------------


def test_no_compilation_under_concurrent_load(clients, engines):
  engine = engines["sequence_classification"]
  client = clients["sequence_classification"]
  assert engine.traces == engine.shapes == 4  # (1, 4) x buckets (16, 32)
  rng = np.random.default_rng(0)
  words = "good bad film plot actors warm dull long".split()

  def request(i):
    inputs = [{"text": " ".join(rng.choice(words, rng.integers(1, 40)))}
              for _ in range(1 + i % 7)]
    return _predict(client, inputs)["predictions"]

  def samples():
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(
                client.get("/metrics").text) for s in family.samples}

  before = samples()
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(request, range(64)))
  rows = sum(1 + i % 7 for i in range(64))
  assert sum(len(a) for a in answers) == rows
  assert engine.traces == 4
  after = samples()
  assert after["serve_compilations[]"] == 4
  assert after["serve_requests_total[('endpoint', '/predict'), ('status', "
               "'200')]"] - before.get("serve_requests_total[('endpoint', "
                                       "'/predict'), ('status', '200')]",
                                       0) == 64
  assert after["serve_batch_rows_sum[]"] - before["serve_batch_rows_sum[]"] \
      == rows
  # Every call padded to one of the two batch sizes.
  calls = after["serve_batch_rows_count[]"] - before["serve_batch_rows_count[]"]
  assert after["serve_batch_padded_size_bucket[('le', '4.0')]"] - before[
      "serve_batch_padded_size_bucket[('le', '4.0')]"] == calls


def test_the_batcher_joins_waiting_requests():
  """Requests that arrive while the model is busy share its next call,
  padded to a bucket and a batch size; each gets its own rows back."""
  from research.serve.batching import DynamicBatcher  # pylint: disable=import-outside-toplevel
  busy, shapes = threading.Event(), []

  def backend(ids, mask, types):
    shapes.append(ids.shape)
    if len(shapes) == 1:
      busy.wait()
    del types
    return ((ids * mask).sum(-1), mask.sum(-1))  # per row: its id sum, length

  batcher = DynamicBatcher(backend, buckets=(4, 8, 16), batch_sizes=(1, 2, 4),
                           max_wait_s=0.0, call_cost=4)
  batcher.start()
  row = lambda n, v: {"input_ids": [v] * n, "token_type_ids": [0] * n}  # pylint: disable=unnecessary-lambda-assignment
  first = batcher.submit([row(3, 1)])
  while not shapes:  # the worker is inside the model with the first request
    threading.Event().wait(0.001)
  waiting = [batcher.submit([row(2, 2), row(10, 3)]),
             batcher.submit([row(5, 4), row(1, 5), row(7, 6)])]
  busy.set()
  assert [tuple(int(x) for x in o) for o in first.result()] == [(3, 3)]
  assert [[tuple(int(x) for x in o) for o in f.result()] for f in waiting] == [
      [(4, 2), (30, 10)], [(20, 5), (5, 1), (42, 7)]]
  # The two waiting requests (5 rows: lengths 2, 10, 5, 1, 7) ran in the
  # same round, cut where padding costs least: 1, 2 padded to 4; 5, 7 to
  # 8; 10 to 16 (40 tokens + 3 calls x 4, against 48 + 2 x 4 for 1-7 in one
  # call of 8).
  assert shapes == [(1, 4), (2, 4), (2, 8), (1, 16)]
  assert batcher.plan([2, 10, 5, 1, 7]) == [[3, 0], [2, 4], [1]]
  batcher.call_cost = 16  # calls dearer: fewer, more padding
  assert batcher.plan([2, 10, 5, 1, 7]) == [[3, 0, 2, 4], [1]]
  batcher.close()


def test_readyz_turns_green_only_when_every_shape_is_compiled(engines,
                                                              tmp_path):
  base = engines["sequence_classification"]
  gate = threading.Event()

  class Gated:  # the same model, held back until the test lets it compile
    name = "gated"
    traces = 0

    def __call__(self, *arrays):
      gate.wait()
      return base.backend(*arrays)

  engine = engine_lib.Engine(
      base.task, Gated(), label_names=base.label_names, version="gated",
      max_length=base.max_length, buckets=base.buckets, limits=LIMITS,
      batching_options=BATCHING)
  with store_lib.FeedbackStore.open(f"sqlite:///{tmp_path}/f.db") as store:
    with TestClient(app_lib.create_app(engine, store)) as client:
      assert client.get("/healthz").status_code == 200
      ready = client.get("/readyz")
      assert ready.status_code == 503 and ready.json()["shapes"] == 4
      response = client.post("/predict", json={"inputs": [{"text": "a"}]})
      assert response.status_code == 503 and "/readyz" in response.text
      gate.set()
      engine.wait_ready(timeout=120)
      assert client.get("/readyz").json() == {
          "ready": True, "compiled": 4, "shapes": 4, "compilations": 0}
      assert _predict(client, [{"text": "a"}])["model_version"] == "gated"
  engine.close()


# --- /feedback, /model, /healthz ------------------------------------------------


def test_feedback_is_stored_with_its_prediction(clients):
  client = clients["sequence_classification"]
  answer = _predict(client, [{"text": "a warm film"}])
  prediction = answer["predictions"][0]
  response = client.post("/feedback", json={
      "prediction_id": prediction["id"], "label": "positive", "rating": 5,
      "comment": "right"})
  assert response.status_code == 201, response.text
  stored = client.store.corrections_since(response.json()["id"] - 1)
  assert len(stored) == 1
  row = stored[0]
  assert (row.label, row.rating, row.comment) == ("positive", 5.0, "right")
  assert row.request == {"text": "a warm film"}
  assert row.prediction["label"] == prediction["label"]
  assert row.model_version == answer["model_version"]
  for body, status, message in [
      ({"prediction_id": "f" * 32, "label": "positive"}, 404,
       "no prediction"),
      ({"prediction_id": prediction["id"]}, 422, "at least one of"),
      ({"prediction_id": prediction["id"], "label": "neutral"}, 422,
       "valid: negative, positive"),
      ({"prediction_id": prediction["id"], "rating": "5"}, 422,
       "valid number"),
      ({"prediction_id": prediction["id"], "comment": "x", "user": 1}, 422,
       "Extra inputs")]:
    response = client.post("/feedback", json=body)
    assert response.status_code == status and message in response.text, (
        body, response.text)
  response = client.post(
      "/feedback", content=f'{{"prediction_id": "{prediction["id"]}", '
      '"rating": NaN}', headers={"content-type": "application/json"})
  assert response.status_code == 422


@pytest.mark.parametrize("task", ["token_classification",
                                  "question_answering", "masked_lm"])
def test_every_head_serves_every_endpoint(clients, engines, task):
  client = clients[task]
  assert client.get("/healthz").json() == {"status": "ok"}
  assert client.get("/readyz").status_code == 200
  info = client.get("/model").json()
  assert info["task"] == task and info["model_version"] == engines[task].version
  item = {"token_classification": {"text": "alice went to rome"},
          "question_answering": {"question": "what color is the car?",
                                 "context": "the car is red"},
          "masked_lm": {"text": "the car is [MASK]"}}[task]
  prediction = _predict(client, [item])["predictions"][0]
  response = client.post("/feedback", json={
      "prediction_id": prediction["id"], "correction": {"note": "checked"}})
  assert response.status_code == 201
  assert client.store.count() >= 1
  assert "serve_requests_total" in client.get("/metrics").text
  schema = client.get("/openapi.json").json()
  assert set(schema["paths"]) == {"/predict", "/explain", "/feedback",
                                  "/model", "/healthz", "/readyz", "/metrics"}


# --- Fuzzing the OpenAPI schema -----------------------------------------------------

FUZZ_EXAMPLES = {"sequence_classification": 500, "token_classification": 200,
                 "question_answering": 200, "masked_lm": 200}


def _fuzz(app, task, examples, statuses):
  """Sends `examples` generated requests to `app`; counts the statuses."""
  import schemathesis  # pylint: disable=import-outside-toplevel
  from hypothesis import HealthCheck, given, settings  # pylint: disable=import-outside-toplevel
  schema = schemathesis.openapi.from_asgi("/openapi.json", app)
  cases = (schema.as_strategy(schemathesis.GenerationMode.POSITIVE) |
           schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))

  @settings(max_examples=examples, deadline=None, derandomize=True,
            database=None, suppress_health_check=list(HealthCheck))
  @given(case=cases)
  def fuzz(case):
    response = case.call()
    key = (task, case.method, case.path, response.status_code)
    statuses[key] = statuses.get(key, 0) + 1
    assert response.status_code < 500, (case.as_curl_command(),
                                        response.text[:500])

  fuzz()  # pylint: disable=no-value-for-parameter


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(clients):
  """Generated requests from each head's /openapi.json, valid and invalid
  (schemathesis' positive and negative modes): at least 1,000 in all, not
  one 5xx."""
  pytest.importorskip("schemathesis")
  statuses = {}
  for task, examples in FUZZ_EXAMPLES.items():
    _fuzz(clients[task].app, task, examples, statuses)
  total = sum(statuses.values())
  assert total >= 1000, statuses
  assert not [k for k in statuses if k[3] >= 500]
  # The runs reached the model, not only the validator.
  for task in FUZZ_EXAMPLES:
    assert statuses.get((task, "POST", "/predict", 200), 0) > 0, statuses
  by_status = {}
  for (_, _, _, status), n in statuses.items():
    by_status[status] = by_status.get(status, 0) + n
  print(f"schemathesis: {total} requests, by status {sorted(by_status.items())}"
        f"; /predict 200s: {[statuses.get((t, 'POST', '/predict', 200), 0) for t in FUZZ_EXAMPLES]}")
