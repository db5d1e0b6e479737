"""Tests of research/metrics/squad_decoding.py on hand-built logits."""

import numpy as np
import pytest

from research import data
from research.data import squad
from research.metrics import squad as squad_eval
from research.metrics import squad_decoding

# One window: [CLS] q q [SEP] alpha beta gamma delta [SEP] pad pad
CONTEXT = "alpha beta gamma delta"
CONTEXT_TOKENS = np.arange(4, 8)
SPANS = np.full((11, 2), -1)
SPANS[4:8] = [(0, 5), (6, 10), (11, 16), (17, 22)]
MASK = np.zeros(11, bool)
MASK[4:8] = True


def window(context_start, context_end, rest=100.0):
  """Logits with `rest` on every non-context position (question, [SEP],
  padding: never part of an answer) and [CLS] = 0."""
  start = np.full(11, rest)
  end = np.full(11, rest)
  start[0] = end[0] = 0.0
  start[CONTEXT_TOKENS] = context_start
  end[CONTEXT_TOKENS] = context_end
  return start, end


def decode_one(start, end, **kw):
  return squad_decoding.decode(start[None], end[None], SPANS[None],
                               MASK[None], [0], [CONTEXT], ["q"], **kw)


# Context start logits [-1, 3, 1, 0], end logits [5, 0.5, 4, 0]. Valid spans
# (end >= start) and scores:
#   alpha: 4, alpha beta: -0.5, alpha..gamma: 3, alpha..delta: -1,
#   beta: 3.5, beta gamma: 7, beta..delta: 3, gamma: 5, gamma delta: 1,
#   delta: 0.
START, END = window([-1, 3, 1, 0], [5, 0.5, 4, 0])


def test_best_span_never_leaves_the_context():
  out = decode_one(START, END)
  assert out.predictions == {"q": "beta gamma"}
  assert out.null_odds == {}  # v1.1: no null answer
  nbest = out.nbest["q"]
  # All 10 valid spans, by score; ties (3, 3) keep the earlier start.
  assert [(c.text, c.score) for c in nbest] == [
      ("beta gamma", 7), ("gamma", 5), ("alpha", 4), ("beta", 3.5),
      ("alpha beta gamma", 3), ("beta gamma delta", 3),
      ("gamma delta", 1), ("delta", 0), ("alpha beta", -0.5),
      ("alpha beta gamma delta", -1)]
  assert (nbest[0].start_char, nbest[0].end_char) == (6, 16)
  assert (nbest[0].start_logit, nbest[0].end_logit) == (3, 4)
  probs = np.array([c.probability for c in nbest])
  scores = np.array([c.score for c in nbest])
  np.testing.assert_allclose(probs, np.exp(scores) / np.exp(scores).sum())


def test_max_answer_length_and_n_best():
  # One-token answers only: gamma (1 + 4 = 5) beats alpha (4), beta (3.5).
  assert decode_one(START, END, max_answer_length=1).predictions["q"] == \
      "gamma"
  # Top-2 starts (beta 3, gamma 1) x top-2 ends (alpha 5, gamma 4): only
  # beta-gamma and gamma-gamma are valid.
  out = decode_one(START, END, n_best=2)
  assert [c.text for c in out.nbest["q"]] == ["beta gamma", "gamma"]


def test_no_valid_span_at_all():
  mask = np.zeros((1, 11), bool)
  out = squad_decoding.decode(START[None], END[None], SPANS[None], mask,
                              [0], [CONTEXT], ["q"], version_2=True)
  assert out.predictions == {"q": ""} and out.nbest == {"q": []}
  assert out.null_odds == {"q": float("inf")}


def test_null_answer_against_threshold():
  start, end = START.copy(), END.copy()
  start[0], end[0] = 5.0, 4.0  # null score 9; best span 7: odds 2.
  out = decode_one(start, end, version_2=True)
  assert out.null_odds == {"q": 2.0}
  assert out.predictions == {"q": ""}  # 2 > threshold 0
  out = decode_one(start, end, version_2=True, null_threshold=2.5)
  assert out.predictions == {"q": "beta gamma"}  # 2 <= 2.5
  start[0] = 2.0  # null 6: odds -1 -> the span
  assert decode_one(start, end, version_2=True).predictions == {
      "q": "beta gamma"}


def test_windows_of_one_example_are_pooled():
  # Two windows of example 0 over the same four tokens, one of example 1.
  # Window 0: CLS 5 + 4 = 9, spans as above (best 7). Window 1: CLS 1 + 0,
  # best span "delta" 2 + 2 = 4. Null = min(9, 1) = 1, odds 1 - 7 = -6.
  s0, e0 = START.copy(), END.copy()
  s0[0], e0[0] = 5.0, 4.0
  s1, e1 = window([-9, -9, -9, 2], [-9, -9, -9, 2])
  s1[0] = 1.0
  s2, e2 = window([0, 0, 0, 9], [0, 0, 0, 9])
  out = squad_decoding.decode(
      np.stack([s0, s2, s1]), np.stack([e0, e2, e1]), np.stack([SPANS] * 3),
      np.stack([MASK] * 3), [0, 1, 0], [CONTEXT, "alpha beta gamma omega"],
      ["a", "b"],
      version_2=True)
  assert out.null_odds == pytest.approx({"a": -6.0, "b": 0.0 - 18.0})
  assert out.predictions == {"a": "beta gamma", "b": "omega"}
  # "delta" came from window 1 (score 4) and window 0 (score 0): kept once,
  # with its best score.
  delta = [c for c in out.nbest["a"] if c.text == "delta"]
  assert len(delta) == 1 and delta[0].score == 4 and delta[0].feature == 2


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match=r"end_logits has shape \(1, 10\)"):
    squad_decoding.decode(START[None], END[None, :10], SPANS[None],
                          MASK[None], [0], [CONTEXT], ["q"])
  with pytest.raises(ValueError, match=r"char_spans has shape \(1, 11\)"):
    squad_decoding.decode(START[None], END[None], SPANS[None, :, 0],
                          MASK[None], [0], [CONTEXT], ["q"])


@pytest.fixture(scope="module")
def long_example(minilm_dir):
  tokenizer = data.load_tokenizer(str(minilm_dir))
  words = [f"item{i}" for i in range(1100)]
  words[-1] = "Zanzibar"  # The last token: in the last window only.
  words[40] = "Madagascar"
  context = " ".join(words)
  ex = squad.SquadExample(id="long", title="", context=context,
                          question="Which island is it?",
                          answers=("Zanzibar",),
                          answer_starts=(context.index("Zanzibar"),))
  feats = squad.build_features(tokenizer, [ex])
  return tokenizer, ex, feats


def test_answer_in_the_last_window_of_a_long_context(long_example):
  tokenizer, ex, feats = long_example
  num_tokens = len(tokenizer(ex.context, add_special_tokens=False)[
      "input_ids"])
  assert num_tokens > 1000 and len(feats) >= 4
  spans = feats.padded("char_spans", fill=-1)
  mask = feats.padded("is_context", fill=False)
  answer_start = ex.answer_starts[0]
  # The answer's tokens lie in the last window only.
  holds = [(spans[f][mask[f]][:, 0] == answer_start).any()
           for f in range(len(feats))]
  assert holds == [False] * (len(feats) - 1) + [True]
  last = len(feats) - 1
  assert feats.start_positions[last] != 0
  assert (feats.start_positions[:last] == 0).all()
  # Logits 0, a decoy "Madagascar" in the first window (6 + 6), the answer
  # in the last (10 + 10) where the training targets put it.
  rng = np.random.default_rng(0)
  start = rng.uniform(-1, 1, spans.shape[:2])
  end = rng.uniform(-1, 1, spans.shape[:2])
  decoy = np.flatnonzero(spans[0, :, 0] == ex.context.index("Madagascar"))
  start[0, decoy[0]] = end[0, decoy[-1]] = 6.0
  start[last, feats.start_positions[last]] = 10.0
  end[last, feats.end_positions[last]] = 10.0
  out = squad_decoding.decode(start, end, spans, mask, feats.example_index,
                              [ex.context], [ex.id], cls_index=feats.cls_index)
  assert out.predictions == {"long": "Zanzibar"}
  assert out.nbest["long"][0].feature == last
  assert out.nbest["long"][1].text == "Madagascar"
  assert squad_eval.evaluate_v1({"long": list(ex.answers)},
                                out.predictions)["exact_match"] == 100.0
