"""Entity-level precision, recall and F1 of tag sequences (CoNLL NER).

Chunks are read from IOB1, IOB2 (BIO) or IOBES tags (`B-PER`, `I-PER`,
`E-PER`, `S-PER`, `O`) by the rules of the CoNLL shared task's `conlleval`
script, the default (non-strict) mode of `seqeval`: an `I-X` after `O` or
after another type starts a chunk, a chunk ends where the next tag cannot
continue it. A predicted chunk counts when its type, start and end all
match a gold chunk.

Why not seqeval: its only release (1.2.2) is a source distribution whose
setup.py no longer builds under current setuptools, so it cannot be a
dependency; these ~40 lines are its default-mode algorithm, tested against
hand-counted cases in tests/test_tasks.py.
"""

from __future__ import annotations


def _parts(tag):
  """(prefix, type) of a tag: "B-PER" -> ("B", "PER"); "O" -> ("O", "")."""
  if not tag or tag == "O":
    return "O", ""
  prefix, sep, kind = tag.partition("-")
  if not sep:  # a bare type, as in some IO-tagged data
    return "I", tag
  return prefix, kind


def _ends(prev, tag, prev_kind, kind):
  return (prev in ("E", "S") or
          (prev in ("B", "I") and tag in ("B", "S", "O")) or
          (prev != "O" and prev_kind != kind))


def _starts(prev, tag, prev_kind, kind):
  return (tag in ("B", "S") or
          (prev in ("E", "S", "O") and tag in ("E", "I")) or
          (tag != "O" and prev_kind != kind))


def chunks(tags) -> set:
  """The chunks of one tag sequence: {(type, first, last)} (inclusive)."""
  out, start, kind = set(), None, ""
  prev = "O"
  for i, tag in enumerate(list(tags) + ["O"]):
    prefix, this_kind = _parts(tag)
    if start is not None and _ends(prev, prefix, kind, this_kind):
      out.add((kind, start, i - 1))
      start = None
    if _starts(prev, prefix, kind, this_kind):
      start = i
    prev, kind = prefix, this_kind
  return out


def entity_scores(predictions, labels) -> dict:
  """Micro-averaged entity precision, recall and F1 over sequences.

  Args:
    predictions: tag sequences (lists of tag names), one per sentence.
    labels: the gold tag sequences, aligned with `predictions`.

  Returns:
    {"entity_precision", "entity_recall", "entity_f1"}; 0.0 where the
    denominator is 0 (as seqeval).
  """
  found = gold = correct = 0
  for pred, true in zip(predictions, labels):
    p, t = chunks(pred), chunks(true)
    found += len(p)
    gold += len(t)
    correct += len(p & t)
  precision = correct / found if found else 0.0
  recall = correct / gold if gold else 0.0
  f1 = (2 * precision * recall / (precision + recall)
        if precision + recall else 0.0)
  return {"entity_precision": precision, "entity_recall": recall,
          "entity_f1": f1}
