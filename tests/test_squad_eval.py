"""Tests of research/metrics/squad.py: the official SQuAD v1.1 / v2.0 logic.

Every expected number is derived by hand in the comments, following the
official scripts (evaluate-v1.1.py, evaluate-v2.0.py).
"""

import json
import math
import random

import pytest

from research.metrics import squad


@pytest.mark.parametrize("text,expected", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),            # all three articles go
    ("THE", ""),                                # lower-cased first
    ("theatre and anthem", "theatre and anthem"),  # whole words only
    ("the-end", "theend"),                      # punctuation removed, no space
    ("A.B.C.", "abc"),                          # "a." -> "a" is not a word
    ("\tNew\nYork  ", "new york"),
    ("Beyoncé's", "beyoncés"),                  # ASCII punctuation only...
    ("Beyoncé’s", "beyoncé’s"),                 # ...U+2019 is kept
    ("El Niño (1997–98)", "el niño 1997–98"),   # en dash kept, () removed
    ("", ""),
])
def test_normalize_answer(text, expected):
  assert squad.normalize_answer(text) == expected


def test_f1_token_overlap():
  # "cat sat on mat" (4) vs "cat on mat" (3): 3 shared; P=3/4, R=1,
  # F1 = 2 * 0.75 / 1.75 = 6/7.
  assert squad.f1("the cat sat on the mat", "a cat on a mat") == \
      pytest.approx(6 / 7)
  # Bag of words: "new new york" vs "new york": min counts new 1, york 1 = 2
  # shared; P=2/3, R=1, F1 = (4/3) / (5/3) = 0.8.
  assert squad.f1("new new york", "New York") == pytest.approx(0.8)
  # Order does not matter.
  assert squad.f1("york new", "new york") == 1.0
  assert squad.f1("Denver", "Broncos") == 0.0


def test_empty_answers_v1_vs_v2():
  # v1.1: no shared token -> 0, even for two empty answers; v2.0: 1 when
  # both are empty (after normalisation), 0 when only one is.
  assert squad.f1("", "") == 0.0
  assert squad.f1("", "", version_2=True) == 1.0
  assert squad.f1("the", "", version_2=True) == 1.0   # "the" -> ""
  assert squad.f1("", "Rollo", version_2=True) == 0.0
  assert squad.f1("Rollo", "", version_2=True) == 0.0
  assert squad.exact_match("", "") == 1
  assert squad.exact_match("The", "") == 1


def test_evaluate_v1_max_over_golds_and_missing():
  gold = {
      "q1": ["Denver Broncos", "The Denver Broncos", "Broncos"],
      "q2": ["Saint Bernadette Soubirous"],
      "q3": ["a copper statue of Christ"],
      "q4": ["1858"],
  }
  predictions = {
      "q1": "denver broncos!",  # EM 1 with golds 1 and 2, F1 1
      "q2": "Bernadette",       # EM 0; P=1, R=1/3 -> F1 = (2/3)/(4/3) = 0.5
      "q3": "",                 # EM 0, F1 0
      # q4 has none: scores 0 but counts.
      "extra": "ignored",       # not in gold: ignored
  }
  # EM = 1/4 = 25%; F1 = (1 + 0.5) / 4 = 37.5%.
  assert squad.evaluate_v1(gold, predictions) == pytest.approx(
      {"exact_match": 25.0, "f1": 37.5})


def test_evaluate_v1_best_gold_differs_per_metric():
  # Golds "Denver Broncos" and "Broncos", prediction "the Denver team"
  # ("denver team"): F1 vs gold 1: 1 shared, P=R=1/2 -> 0.5; vs gold 2: 0.
  gold = {"q": ["Denver Broncos", "Broncos"]}
  assert squad.evaluate_v1(gold, {"q": "the Denver team"}) == \
      pytest.approx({"exact_match": 0.0, "f1": 50.0})


# Six questions: three answerable (a*), three not (n*).
V2_GOLD = {
    "a1": ["Normandy", "Normandy", "Normandy"],
    "a2": ["10th and 11th centuries", "in the 10th and 11th centuries"],
    "a3": ["Rollo"],
    "n1": [],
    "n2": [],
    "n3": [],
}
V2_PREDICTIONS = {
    "a1": "Normandy",        # EM 1, F1 1
    # "11th centuries" (2) vs "10th and 11th centuries" (4): 2 shared, P=1,
    # R=1/2 -> 2/3; vs "in 10th and 11th centuries" (5): R=2/5 -> 4/7.
    "a2": "11th centuries",  # EM 0, F1 max(2/3, 4/7) = 2/3
    "a3": "",                # no answer to an answerable one: EM 0, F1 0
    "n1": "",                # right: EM 1, F1 1
    "n2": "Charles III",     # wrong: EM 0, F1 0
    "n3": "the",             # normalises to "": EM 1, F1 1
}
V2_ODDS = {"a1": -5.0, "a2": 1.5, "a3": 4.0, "n1": 3.0, "n2": 2.0, "n3": 2.5}


def test_evaluate_v2_without_null_odds():
  # All odds 0, threshold 1: nothing is switched to "no answer".
  # exact: 1 + 0 + 0 + 1 + 0 + 1 = 3 -> 50%; f1: 1 + 2/3 + 0 + 1 + 0 + 1.
  result = squad.evaluate_v2(V2_GOLD, V2_PREDICTIONS)
  assert list(result) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1",
                          "HasAns_total", "NoAns_exact", "NoAns_f1",
                          "NoAns_total"]
  assert result == pytest.approx({
      "exact": 50.0, "f1": 100 * (11 / 3) / 6, "total": 6,
      "HasAns_exact": 100 / 3, "HasAns_f1": 100 * (5 / 3) / 3,
      "HasAns_total": 3,
      "NoAns_exact": 200 / 3, "NoAns_f1": 200 / 3, "NoAns_total": 3})


def test_evaluate_v2_threshold_and_best_threshold():
  result = squad.evaluate_v2(V2_GOLD, V2_PREDICTIONS, V2_ODDS,
                             null_threshold=1.0)
  # Odds > 1 -> "no answer": a2 (1.5: answerable, now 0), a3 (already 0),
  # n1 (already 1), n2 (2: now right, 1), n3 (2.5: 1, as before).
  # exact = f1 = (1 + 0 + 0 + 1 + 1 + 1) / 6.
  assert result["exact"] == pytest.approx(400 / 6)
  assert result["f1"] == pytest.approx(400 / 6)
  assert result["HasAns_f1"] == pytest.approx(100 / 3)
  assert result["NoAns_exact"] == pytest.approx(100.0)
  # Threshold search, odds ascending: a1 -5, a2 1.5, n2 2, n3 2.5, n1 3,
  # a3 4. Start: all "no answer" = 3 (the unanswerable ones).
  # exact: a1 +1 -> 4 (best, thresh -5); a2 +0 -> 4 (not better);
  #   n2 -1 (non-empty) -> 3; n3 -1 ("the" is a non-empty string) -> 2;
  #   n1 +0 (empty) -> 2; a3 +0 -> 2. best 4/6.
  # f1: a1 -> 4 (thresh -5); a2 +2/3 -> 4.667 (best, thresh 1.5); then down.
  assert result["best_exact"] == pytest.approx(400 / 6)
  assert result["best_exact_thresh"] == -5.0
  assert result["best_f1"] == pytest.approx(100 * (14 / 3) / 6)
  assert result["best_f1_thresh"] == 1.5
  # Scoring at the best F1 threshold gives the best F1 (a2 answered, n2, n3,
  # n1 and a3 "no answer": 1 + 2/3 + 0 + 1 + 1 + 1).
  at_best = squad.evaluate_v2(V2_GOLD, V2_PREDICTIONS, V2_ODDS,
                              null_threshold=1.5)
  assert at_best["f1"] == pytest.approx(result["best_f1"])


def test_best_threshold_no_switch_helps():
  # Every answerable prediction is wrong: answering none is best; the
  # script reports thresh 0.0 with the all-"no answer" score (1 of 2).
  gold = {"a": ["Rollo"], "n": []}
  preds = {"a": "Charles", "n": ""}
  result = squad.evaluate_v2(gold, preds, {"a": 0.3, "n": 0.7})
  assert result["best_exact"] == pytest.approx(50.0)
  assert result["best_exact_thresh"] == 0.0


def test_evaluate_v2_answer_that_normalises_to_nothing():
  # Answerable (non-empty answers list), but its only answer normalises to ""
  # so the gold becomes "": an empty prediction is right and counts in HasAns.
  result = squad.evaluate_v2({"q": ["The"]}, {"q": ""})
  assert result["HasAns_exact"] == 100.0 and result["HasAns_total"] == 1
  assert "NoAns_total" not in result


def test_evaluate_v2_needs_every_prediction():
  with pytest.raises(ValueError, match=r"1 of 6 questions have no "
                     r"predictions entry \(first: \['n3'\]\)"):
    squad.evaluate_v2(V2_GOLD, {k: v for k, v in V2_PREDICTIONS.items()
                                if k != "n3"})
  with pytest.raises(ValueError, match="no null_odds entry"):
    squad.evaluate_v2(V2_GOLD, V2_PREDICTIONS, {"a1": 0.0})


def test_best_f1_is_the_best_over_all_thresholds():
  # Independent check of the search: brute force over every threshold (each
  # question's odds, and below all of them) with the plain thresholded
  # scoring. Predictions for unanswerable questions are "" or a real word,
  # so the script's raw-string quirk does not apply.
  rng = random.Random(0)
  words = ["alpha", "beta", "gamma", "delta"]
  gold, preds, odds = {}, {}, {}
  for i in range(60):
    qid = f"q{i}"
    answerable = rng.random() < 0.5
    gold[qid] = ([" ".join(rng.sample(words, rng.randint(1, 3)))
                  for _ in range(rng.randint(1, 3))] if answerable else [])
    preds[qid] = ("" if rng.random() < 0.3
                  else " ".join(rng.sample(words, rng.randint(1, 3))))
    odds[qid] = rng.uniform(-10, 10)
  result = squad.evaluate_v2(gold, preds, odds)
  for key in ("exact", "f1"):
    brute = max(squad.evaluate_v2(gold, preds, odds, t)[key]
                for t in [-math.inf] + list(odds.values()))
    assert result[f"best_{key}"] == pytest.approx(brute)
    # The reported threshold achieves it (the script's 0.0 means "below all").
    thresh = result[f"best_{key}_thresh"]
    if thresh != 0.0:
      assert squad.evaluate_v2(gold, preds, odds, thresh)[key] == \
          pytest.approx(brute)


def _official_file(tmp_path, qas, version="v2.0"):
  context = "Normandy is a region in France."
  path = tmp_path / "dev.json"
  path.write_text(json.dumps({"version": version, "data": [{
      "title": "Normans", "paragraphs": [{"context": context, "qas": qas}]}]}))
  return str(path)


def test_files_round_trip_and_command_line(tmp_path, capsys):
  data_file = _official_file(tmp_path, [
      {"id": "a", "question": "Where?", "is_impossible": False,
       "answers": [{"text": "Normandy", "answer_start": 0},
                   {"text": "France", "answer_start": 24}]},
      {"id": "n", "question": "Who?", "is_impossible": True, "answers": [],
       "plausible_answers": [{"text": "France", "answer_start": 24}]},
  ])
  pred_file, odds_file = tmp_path / "predictions.json", tmp_path / "odds.json"
  squad.write_predictions(pred_file, {"a": "France.", "n": "Normandy"})
  squad.write_null_odds(odds_file, {"a": -1.0, "n": 0.5})
  assert json.loads(pred_file.read_text()) == {"a": "France.", "n": "Normandy"}
  assert squad.read_json_map(str(odds_file), float) == {"a": -1.0, "n": 0.5}
  # Threshold 0: "n" (0.5) becomes "no answer" (right); "a" is right too.
  result = squad.evaluate_files(data_file, str(pred_file), str(odds_file),
                                null_threshold=0.0)
  assert result["exact"] == 100.0 and result["total"] == 2
  assert squad.main([data_file, str(pred_file)]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["exact"] == 50.0  # threshold 1, no odds: "n" is wrong.


def test_v1_file_uses_v1_rules(tmp_path):
  data_file = _official_file(tmp_path, [
      {"id": "a", "question": "Where?",
       "answers": [{"text": "Normandy", "answer_start": 0}]}], version="1.1")
  pred_file = tmp_path / "p.json"
  squad.write_predictions(pred_file, {})
  assert squad.evaluate_files(data_file, str(pred_file)) == {
      "exact_match": 0.0, "f1": 0.0}  # v1.1: a missing answer scores 0
  odds_file = tmp_path / "o.json"
  squad.write_null_odds(odds_file, {"a": 0.0})
  with pytest.raises(ValueError, match="v1.1: null odds apply to v2.0"):
    squad.evaluate_files(data_file, str(pred_file), str(odds_file))


def test_bad_prediction_files_are_named(tmp_path, capsys):
  bad = tmp_path / "bad.json"
  bad.write_text('{"q1": "x", "q2": 3}')
  with pytest.raises(ValueError, match=r"bad.json, question q2: expected a "
                     r"str, got 3"):
    squad.read_json_map(str(bad), str)
  bad.write_text('["x"]')
  with pytest.raises(ValueError, match="expected a JSON object"):
    squad.read_json_map(str(bad), float)
  bad.write_text("{")
  assert squad.main([str(bad), str(bad)]) == 2
  assert capsys.readouterr().out.startswith("error: ")


def test_trivial_baselines_score_as_the_official_script(tmp_path, capsys):
  from research.data import squad as squad_data  # pylint: disable=import-outside-toplevel
  context = "Paris is big. It lies on the Seine!  Rome is old."
  examples = [
      squad_data.SquadExample(id="a", title="", context=context,
                              question="q", answers=("Paris is big",),
                              answer_starts=(0,)),
      squad_data.SquadExample(id="b", title="", context=context,
                              question="q", is_impossible=True)]
  assert squad.baseline_predictions(examples, "first_sentence") == {
      "a": "Paris is big.", "b": "Paris is big."}
  assert squad.baseline_predictions(examples, "null") == {"a": "", "b": ""}
  with pytest.raises(ValueError, match="valid: null, first_sentence"):
    squad.baseline_predictions(examples, "random")
  path = tmp_path / "dev.json"
  path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t",
      "paragraphs": [{"context": context, "qas": [
          {"id": "a", "question": "q", "is_impossible": False,
           "answers": [{"text": "Paris is big", "answer_start": 0}]},
          {"id": "b", "question": "q", "is_impossible": True,
           "answers": []}]}]}]}))
  # first_sentence: a right (EM 1), b wrong; null: a wrong, b right.
  for kind, exact in (("first_sentence", 50.0), ("null", 50.0)):
    assert squad.main([str(path), "--baseline", kind]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exact"] == exact and result["total"] == 2
    assert result["HasAns_exact"] == (100.0 if kind != "null" else 0.0)
