"""SQuAD's exact match and F1 of answer texts, as its official script scores.

Both compare normalised texts (lower case, no punctuation, no articles
a/an/the, single spaces) against every gold answer and keep the best; F1 is
over the bag of normalised words. Written out rather than imported: the
official `evaluate-v1.1.py` is a script, not a package, and Hugging Face's
`evaluate` fetches its metric code from the hub (no offline runs). Scores are
fractions in [0, 1] like this codebase's other metrics (the script prints
percentages).
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
  """Lower case, punctuation and articles removed, whitespace collapsed."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers) -> float:
  """1.0 if the normalised prediction equals a normalised gold answer."""
  return float(max(normalize(prediction) == normalize(a) for a in answers))


def f1(prediction: str, answers) -> float:
  """The best word-overlap F1 of the prediction against the gold answers."""

  def one(gold):
    pred_words, gold_words = normalize(prediction).split(), normalize(gold).split()
    common = collections.Counter(pred_words) & collections.Counter(gold_words)
    same = sum(common.values())
    if same == 0:
      return 0.0
    precision, recall = same / len(pred_words), same / len(gold_words)
    return 2 * precision * recall / (precision + recall)

  return max(one(a) for a in answers)
