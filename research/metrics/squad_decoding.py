"""From per-window start/end logits to SQuAD answers (numpy, any model).

An example's context is split into several windows (features); `decode`
scores answer spans over all of them, as BERT's `run_squad.py` and Hugging
Face's `postprocess_qa_predictions` do:

1. In each window, the `n_best` highest start and end logits among the
   context tokens are paired; a pair is a candidate when end >= start and it
   spans at most `max_answer_length` tokens. Its score is start + end logit.
   (The reference scripts take the top n over all positions and then drop
   non-context ones, which can leave fewer candidates; a span never leaves
   the context either way.)
2. Candidates of all windows are ranked by score; a span seen in two
   overlapping windows keeps its best score; the top `n_best` stay, their
   text cut from the context by the tokens' character spans.
3. SQuAD v2.0: the null score is the smallest [CLS] start + end logit over
   the windows; `null_odds = null score - best span score`, and the answer
   is "" (no answer) when `null_odds > null_threshold`. Choose the threshold
   on dev: the official v2.0 evaluation's `best_f1_thresh` on these odds.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One answer span.

  Attributes:
    text: the context's characters [start_char, end_char).
    start_char, end_char: the span in the example's context.
    start_logit, end_logit: the logits of its first and last token.
    score: start_logit + end_logit.
    probability: softmax of `score` over the example's n-best list.
    feature: the window it was scored in.
  """
  text: str
  start_char: int
  end_char: int
  start_logit: float
  end_logit: float
  score: float
  probability: float
  feature: int


@dataclasses.dataclass
class Decoded:
  """Answers of every example.

  Attributes:
    predictions: question id -> answer text ("" = no answer): the content of
      predictions.json.
    null_odds: question id -> null score - best span score (v2.0 only): the
      content of null_odds.json. +inf when no span was possible.
    nbest: question id -> its n-best `Candidate`s, best first.
  """
  predictions: dict
  null_odds: dict
  nbest: dict


def _window_candidates(start, end, context, n_best, max_answer_length):
  """(score, start token, end token) of the valid pairs of one window."""
  tokens = np.flatnonzero(context)
  if not len(tokens):
    return []
  k = min(n_best, len(tokens))
  # Stable sort: among equal logits the earlier token comes first.
  top_start = tokens[np.argsort(-start[tokens], kind="stable")[:k]]
  top_end = tokens[np.argsort(-end[tokens], kind="stable")[:k]]
  s, e = np.meshgrid(top_start, top_end, indexing="ij")
  ok = (e >= s) & (e - s + 1 <= max_answer_length)
  s, e = s[ok], e[ok]
  scores = start[s] + end[e]
  # Only a window's n_best best spans can reach the example's n-best list
  # (spans are unique within a window); fewer tuples, the same answers.
  keep = np.argsort(-scores, kind="stable")[:n_best]
  return list(zip(scores[keep].tolist(), s[keep].tolist(), e[keep].tolist()))


def decode(start_logits, end_logits, char_spans, context_mask,
           feature_example, contexts, example_ids, *, cls_index=None,
           n_best: int = 20, max_answer_length: int = 30,
           version_2: bool = False, null_threshold: float = 0.0) -> Decoded:
  """Chooses each example's answer from its windows' logits.

  Args:
    start_logits, end_logits: float [F, L], one row per window (feature);
      positions past a window's end are ignored (context_mask False).
    char_spans: int [F, L, 2], each context token's [start, end) character
      span in its example's context (`QAFeatures.padded("char_spans")`).
    context_mask: bool [F, L], True for the context tokens of each window.
    feature_example: int [F], each window's example index.
    contexts: the examples' context strings.
    example_ids: the examples' question ids (the keys of the outputs).
    cls_index: int [F], each window's [CLS] position (default 0).
    n_best: start and end positions per window, and candidates kept.
    max_answer_length: the longest answer in tokens.
    version_2: decide between a span and "no answer" (SQuAD v2.0).
    null_threshold: v2.0: predict "no answer" when null_odds exceeds it.

  Returns:
    A `Decoded` with an entry for every example that has a window.
  """
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  char_spans = np.asarray(char_spans)
  context_mask = np.asarray(context_mask, bool)
  feature_example = np.asarray(feature_example)
  num_features = len(feature_example)
  if cls_index is None:
    cls_index = np.zeros(num_features, np.int64)
  for name, array in (("start_logits", start_logits),
                      ("end_logits", end_logits),
                      ("context_mask", context_mask)):
    if array.shape != start_logits.shape or array.shape[0] != num_features:
      raise ValueError(f"{name} has shape {array.shape}; expected "
                       f"[{num_features}, L] like start_logits "
                       f"{start_logits.shape}")
  if char_spans.shape != start_logits.shape + (2,):
    raise ValueError(f"char_spans has shape {char_spans.shape}; expected "
                     f"{start_logits.shape + (2,)}")
  if len(contexts) != len(example_ids):
    raise ValueError(f"{len(contexts)} contexts but {len(example_ids)} ids")
  out = Decoded(predictions={}, null_odds={}, nbest={})
  order = np.argsort(feature_example, kind="stable")
  bounds = np.flatnonzero(np.diff(feature_example[order])) + 1
  for features in np.split(order, bounds):
    if not len(features):
      continue
    example = int(feature_example[features[0]])
    context, qid = contexts[example], example_ids[example]
    null_score = np.inf
    pool = []
    for f in features:
      cls = int(cls_index[f])
      null_score = min(null_score, start_logits[f, cls] + end_logits[f, cls])
      pool += [(score, f, s, e) for score, s, e in _window_candidates(
          start_logits[f], end_logits[f], context_mask[f], n_best,
          max_answer_length)]
    # Best first; ties go to the earlier window and position.
    pool.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
    nbest, seen = [], set()
    for score, f, s, e in pool:
      span = (int(char_spans[f, s, 0]), int(char_spans[f, e, 1]))
      if span in seen:
        continue
      seen.add(span)
      nbest.append((score, f, s, e, span))
      if len(nbest) == n_best:
        break
    scores = np.asarray([c[0] for c in nbest])
    probs = np.exp(scores - scores.max()) if nbest else scores
    probs = probs / probs.sum() if nbest else probs
    out.nbest[qid] = [
        Candidate(text=context[a:b], start_char=a, end_char=b,
                  start_logit=float(start_logits[f, s]),
                  end_logit=float(end_logits[f, e]), score=float(score),
                  probability=float(p), feature=int(f))
        for (score, f, s, e, (a, b)), p in zip(nbest, probs)]
    best = out.nbest[qid][0] if nbest else None
    if not version_2:
      out.predictions[qid] = best.text if best else ""
      continue
    odds = float(null_score - best.score) if best else float("inf")
    out.null_odds[qid] = odds
    out.predictions[qid] = best.text if odds <= null_threshold else ""
  return out
