"""SQuAD v1.1 and v2.0 exact match and F1, as the official scripts compute them.

The `evaluate` package fetches its metric code from the hub at run time, so
the logic of the two official scripts (`evaluate-v1.1.py`, `evaluate-v2.0.py`
from the SQuAD site) is written out here, quirks included:

- Answers are normalised by lower-casing, removing ASCII punctuation
  (`string.punctuation`), the articles a/an/the and extra whitespace. F1 is
  over the normalised whitespace tokens (bag of words); each question scores
  its best gold answer.
- v1.1: a question without a prediction scores 0 (and is counted); an empty
  prediction against an empty gold answer has F1 0.
- v2.0: a question is answerable when its `answers` list is non-empty; gold
  answers that normalise to "" are dropped and an unanswerable question's
  only gold answer is "". Empty prediction = "no answer": F1 and EM are 1
  exactly when the gold is empty too. Scores split into HasAns / NoAns.
  `null_odds` (`na_prob` in the script: the higher, the likelier "no
  answer") plus `null_threshold` turn a question into "no answer" when its
  odds exceed the threshold; `best_exact` / `best_f1` are the scores at the
  best such threshold, found as the script's `find_all_best_thresh` does.
  Every question needs a prediction (the script fails with a KeyError
  otherwise; here the error names the questions).

`predictions.json` maps question id -> answer text ("" = no answer) and
`null_odds.json` question id -> odds, the official scripts' input files.

Command line, the same as the official scripts (prints their JSON):

    python -m research.metrics.squad dev-v2.0.json predictions.json \
        --null_odds null_odds.json
    python -m research.metrics.squad dev-v2.0.json --baseline null

`--baseline` scores a trivial baseline (`baseline_predictions`): "null"
(always no answer) or "first_sentence" (the context's first sentence).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import string
from typing import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
  """Lower-cases, drops punctuation and articles, collapses whitespace."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> int:
  """1 if the normalised strings are equal, else 0 (both scripts)."""
  return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, *, version_2: bool = False) -> float:
  """Token-level F1 between one prediction and one gold answer.

  Args:
    prediction: the predicted answer text.
    gold: one gold answer text.
    version_2: the v2.0 script's rule for empty answers (F1 = 1 when both
      normalise to nothing, 0 when only one does); v1.1 gives 0 whenever no
      token is shared, so empty vs empty is 0 there.

  Returns:
    The F1 in [0, 1].
  """
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  if version_2 and (not pred_tokens or not gold_tokens):
    return float(pred_tokens == gold_tokens)
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision = same / len(pred_tokens)
  recall = same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def evaluate_v1(gold: Mapping[str, Sequence[str]],
                predictions: Mapping[str, str]) -> dict:
  """The official SQuAD v1.1 evaluation.

  Args:
    gold: question id -> its gold answer texts (SQuAD v1.1 dev has 1-6 per
      question, train 1).
    predictions: question id -> predicted text; ids not in `gold` are
      ignored, questions without one score 0.

  Returns:
    {"exact_match": %, "f1": %} over all questions of `gold`.
  """
  if not gold:
    raise ValueError("no questions to evaluate")
  em = f1_sum = 0.0
  missing = [qid for qid in gold if qid not in predictions]
  if missing:
    logging.warning("%d of %d questions have no prediction and score 0 "
                    "(first: %s)", len(missing), len(gold), missing[0])
  for qid, answers in gold.items():
    if qid in predictions:
      pred = predictions[qid]
      em += max(exact_match(pred, a) for a in answers)
      f1_sum += max(f1(pred, a) for a in answers)
  return {"exact_match": 100.0 * em / len(gold),
          "f1": 100.0 * f1_sum / len(gold)}


def _raw_scores_v2(gold, predictions):
  exact, f1s = {}, {}
  for qid, answers in gold.items():
    golds = [a for a in answers if normalize_answer(a)] or [""]
    pred = predictions[qid]
    exact[qid] = max(exact_match(pred, a) for a in golds)
    f1s[qid] = max(f1(pred, a, version_2=True) for a in golds)
  return exact, f1s


def _apply_threshold(scores, null_odds, has_answer, threshold):
  # A question whose odds exceed the threshold is answered "no answer": right
  # exactly when it has none.
  return {qid: float(not has_answer[qid]) if null_odds[qid] > threshold else s
          for qid, s in scores.items()}


def _mean(exact, f1s, qids):
  total = len(qids)
  return {"exact": 100.0 * sum(exact[q] for q in qids) / total,
          "f1": 100.0 * sum(f1s[q] for q in qids) / total,
          "total": total}


def best_threshold(predictions: Mapping[str, str], scores: Mapping[str, float],
                   null_odds: Mapping[str, float],
                   has_answer: Mapping[str, bool]) -> tuple[float, float]:
  """The null-odds threshold that maximises a score (`find_best_thresh`).

  Starts from "every question answered 'no answer'" (each unanswerable one
  scores 1) and, in increasing order of odds, switches one question at a
  time to its prediction: an answerable question gains its raw score, an
  unanswerable one loses 1 if the raw prediction string is non-empty (even if
  it normalises to ""; a quirk of the script, kept). The best running total
  wins; the first one on ties.

  Args:
    predictions: question id -> predicted text.
    scores: question id -> raw exact or F1 score (without threshold).
    null_odds: question id -> odds of "no answer".
    has_answer: question id -> whether it has gold answers.

  Returns:
    (best score in %, threshold): predict "no answer" when odds > threshold.
  """
  score = best = sum(1 for v in has_answer.values() if not v)
  threshold = 0.0
  for qid in sorted(null_odds, key=lambda q: null_odds[q]):
    if qid not in scores:
      continue
    if has_answer[qid]:
      score += scores[qid]
    elif predictions[qid]:
      score -= 1
    if score > best:
      best = score
      threshold = null_odds[qid]
  return 100.0 * best / len(scores), threshold


def evaluate_v2(gold: Mapping[str, Sequence[str]],
                predictions: Mapping[str, str],
                null_odds: Mapping[str, float] | None = None,
                null_threshold: float = 1.0) -> dict:
  """The official SQuAD v2.0 evaluation.

  Args:
    gold: question id -> its gold answer texts, [] for an unanswerable one.
    predictions: question id -> predicted text, "" for no answer; every
      question of `gold` needs one.
    null_odds: question id -> odds of "no answer" (the script's
      `--na-prob-file`), or None: all 0 and no threshold search.
    null_threshold: odds above this predict "no answer" (the script's
      `--na-prob-thresh`, default 1.0).

  Returns:
    The script's dict: exact, f1, total, HasAns_{exact,f1,total} when some
    questions are answerable, NoAns_{...} when some are not, and with
    `null_odds` also best_exact, best_exact_thresh, best_f1, best_f1_thresh.
  """
  if not gold:
    raise ValueError("no questions to evaluate")
  for name, given in (("predictions", predictions), ("null_odds", null_odds)):
    missing = [qid for qid in gold if given is not None and qid not in given]
    if missing:
      raise ValueError(
          f"{len(missing)} of {len(gold)} questions have no {name} entry "
          f"(first: {missing[:3]}); the official v2.0 script needs one for "
          "every question")
  has_answer = {qid: bool(answers) for qid, answers in gold.items()}
  odds = null_odds if null_odds is not None else {q: 0.0 for q in gold}
  exact_raw, f1_raw = _raw_scores_v2(gold, predictions)
  exact = _apply_threshold(exact_raw, odds, has_answer, null_threshold)
  f1s = _apply_threshold(f1_raw, odds, has_answer, null_threshold)
  out = _mean(exact, f1s, list(gold))
  for prefix, wanted in (("HasAns", True), ("NoAns", False)):
    qids = [q for q, v in has_answer.items() if v == wanted]
    if qids:
      out.update({f"{prefix}_{k}": v
                  for k, v in _mean(exact, f1s, qids).items()})
  if null_odds is not None:
    # The script searches over its whole na_prob file; extra ids would need
    # has_answer entries, so only the gold questions' odds take part.
    odds = {q: null_odds[q] for q in gold}
    out["best_exact"], out["best_exact_thresh"] = best_threshold(
        predictions, exact_raw, odds, has_answer)
    out["best_f1"], out["best_f1_thresh"] = best_threshold(
        predictions, f1_raw, odds, has_answer)
  return out


def write_predictions(path: str, predictions: Mapping[str, str]) -> None:
  """Writes `predictions.json`: {question id: answer text, "" = no answer}."""
  _write_json(path, {str(k): str(v) for k, v in predictions.items()})


def write_null_odds(path: str, null_odds: Mapping[str, float]) -> None:
  """Writes `null_odds.json`: {question id: odds of no answer} (v2.0)."""
  _write_json(path, {str(k): float(v) for k, v in null_odds.items()})


def _write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=0)
    f.write("\n")


def read_json_map(path: str, value_type: type) -> dict:
  """Reads a predictions.json or null_odds.json file, checking its values.

  Args:
    path: the file.
    value_type: str (predictions) or float (null odds).

  Returns:
    {question id: value}.

  Raises:
    ValueError: not a JSON object of question id -> value_type, naming the
      file and the first bad question id.
  """
  with open(path, encoding="utf-8") as f:
    try:
      obj = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object of question id -> "
                     f"{value_type.__name__}, got {type(obj).__name__}")
  allowed = (str,) if value_type is str else (int, float)
  for qid, value in obj.items():
    if isinstance(value, bool) or not isinstance(value, allowed):
      raise ValueError(f"{path}, question {qid}: expected a "
                       f"{value_type.__name__}, got {value!r}")
  return {qid: value_type(v) for qid, v in obj.items()}


BASELINES = ("null", "first_sentence")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def baseline_predictions(examples, kind: str) -> dict:
  """A trivial baseline's predictions.json content for `SquadExample`s.

  Args:
    examples: the questions (`research.data.squad.SquadExample`).
    kind: "null" (always no answer: v2.0's NoAns share) or
      "first_sentence" (the context's first sentence, ending at the first
      ".", "!" or "?" followed by whitespace).
  """
  if kind not in BASELINES:
    raise ValueError(f"baseline {kind!r}; valid: {', '.join(BASELINES)}")
  if kind == "null":
    return {ex.id: "" for ex in examples}
  return {ex.id: _SENTENCE_END.split(ex.context.strip(), maxsplit=1)[0]
          for ex in examples}


def evaluate_files(data_file: str, prediction_file: str,
                   null_odds_file: str | None = None,
                   null_threshold: float = 1.0) -> dict:
  """Scores prediction files against an official SQuAD JSON file.

  v2.0 (the file's version, or any `is_impossible` question) is scored by
  `evaluate_v2`, v1.1 by `evaluate_v1`. Like the official scripts, only the
  answer texts are used (answer_start is not checked).
  """
  from research.data import squad as squad_data  # pylint: disable=import-outside-toplevel
  dataset = squad_data.read_squad(data_file, check_spans=False)
  gold = squad_data.gold_answers(dataset.examples)
  predictions = read_json_map(prediction_file, str)
  if dataset.version_2:
    odds = read_json_map(null_odds_file, float) if null_odds_file else None
    return evaluate_v2(gold, predictions, odds, null_threshold)
  if null_odds_file:
    raise ValueError(f"{data_file} is SQuAD v1.1: null odds apply to v2.0 "
                     "only")
  return evaluate_v1(gold, predictions)


def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("data_file", help="official SQuAD JSON (dev set)")
  parser.add_argument("prediction_file", nargs="?", default=None,
                      help="predictions.json (or --baseline)")
  parser.add_argument("--baseline", choices=BASELINES, default=None,
                      help="score a trivial baseline instead of a file")
  parser.add_argument("--null_odds", default=None,
                      help="null_odds.json (v2.0, the script's na_prob file)")
  parser.add_argument("--null_threshold", type=float, default=1.0,
                      help="predict no answer when odds exceed this")
  args = parser.parse_args(argv)
  if (args.prediction_file is None) == (args.baseline is None):
    parser.error("give a prediction_file or --baseline, not both")
  try:
    if args.baseline:
      from research.data import squad as squad_data  # pylint: disable=import-outside-toplevel
      dataset = squad_data.read_squad(args.data_file, check_spans=False)
      gold = squad_data.gold_answers(dataset.examples)
      predictions = baseline_predictions(dataset.examples, args.baseline)
      result = (evaluate_v2(gold, predictions) if dataset.version_2
                else evaluate_v1(gold, predictions))
    else:
      result = evaluate_files(args.data_file, args.prediction_file,
                              args.null_odds, args.null_threshold)
  except (ValueError, OSError) as e:
    print(f"error: {e}")
    return 2
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
