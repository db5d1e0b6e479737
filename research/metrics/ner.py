"""Entity-level precision, recall and F1 for IOB-tagged sequences (seqeval).

Two ways to read an entity out of a tag sequence:

- "conlleval" (reported by this project; the BERT paper's CoNLL-2003
  numbers come from the CoNLL shared task's `conlleval` script): an entity
  starts at any B-X, and at an I-X after O, after another type or at the
  start of the sentence; it ends where the next tag does not continue it.
  IOB1 and IOB2 read alike. seqeval's default mode (`mode=None`).
- "strict" (seqeval `mode="strict", scheme=IOB2`): only B-X starts an
  entity; an I-X with no B-X before it is not part of any entity. The two
  agree on well-formed IOB2; they differ on a model's ill-formed output.

An entity counts as correct when its type, first and last token all match a
gold entity. Scores are fractions in [0, 1]; conlleval prints percentages.
"""

from __future__ import annotations

MODES = ("conlleval", "strict")


def _seqeval():
  """seqeval's modules, or an error saying how to install it."""
  try:
    from seqeval import metrics, scheme  # pylint: disable=import-outside-toplevel
    from seqeval.metrics import sequence_labeling  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "NER scores need seqeval: PIP_CONSTRAINT=$PWD/constraints.txt "
        'python3 -m pip install -e ".[ner]" (see setup.py)') from e
  return metrics, scheme, sequence_labeling


def _mode_kwargs(mode, scheme):
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  return ({"mode": None} if mode == "conlleval" else
          {"mode": "strict", "scheme": scheme.IOB2})


def _check(gold, predicted):
  if len(gold) != len(predicted):
    raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} "
                     "predicted")
  for i, (g, p) in enumerate(zip(gold, predicted)):
    if len(g) != len(p):
      raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} "
                       "predicted")


def entity_scores(gold, predicted, *, mode: str = "conlleval") -> dict:
  """Micro precision / recall / F1 over entities, per type, and accuracy.

  Args:
    gold: one list of IOB tags per sentence.
    predicted: the predicted tags, same shape.
    mode: "conlleval" (the project's reported numbers) or "strict" IOB2.

  Returns:
    {"precision", "recall", "f1": micro over all entities,
     "accuracy": token accuracy (conlleval prints it too),
     "per_type": {type: {"precision", "recall", "f1", "support"}},
     "num_gold", "num_predicted": entity counts}.
  """
  metrics, scheme, _ = _seqeval()
  kw = _mode_kwargs(mode, scheme)
  _check(gold, predicted)
  gold = [list(s) for s in gold]
  predicted = [list(s) for s in predicted]
  # zero_division=0: a type never predicted scores 0 without a warning.
  report = metrics.classification_report(gold, predicted, output_dict=True,
                                         zero_division=0, **kw)
  micro = report.pop("micro avg")
  for average in ("macro avg", "weighted avg"):
    report.pop(average)
  num_predicted = sum(
      len(s) for s in _entity_sets(predicted, kw).values())
  return {
      "precision": float(micro["precision"]),
      "recall": float(micro["recall"]),
      "f1": float(micro["f1-score"]),
      "accuracy": float(metrics.accuracy_score(gold, predicted)),
      "per_type": {t: {"precision": float(r["precision"]),
                       "recall": float(r["recall"]),
                       "f1": float(r["f1-score"]),
                       "support": int(r["support"])}
                   for t, r in sorted(report.items())},
      "num_gold": int(micro["support"]),
      "num_predicted": num_predicted,
  }


def _entity_sets(sentences, kw):
  """{type: set of (sentence, first, last)} as seqeval reads them."""
  _, scheme, sequence_labeling = _seqeval()
  out = {}
  for i, tags in enumerate(sentences):
    if kw["mode"] is None:
      found = sequence_labeling.get_entities(tags)
    else:  # Entity.end is exclusive.
      found = [(e.tag, e.start, e.end - 1) for e in
               scheme.Entities([tags], kw["scheme"]).entities[0]]
    for kind, first, last in found:
      out.setdefault(kind, set()).add((i, first, last))
  return out


def entities(tags, *, mode: str = "conlleval") -> list:
  """The entities of one tag sequence as (type, first, last) token indices."""
  kw = _mode_kwargs(mode, _seqeval()[1])
  found = _entity_sets([list(tags)], kw)
  return sorted(((kind, start, end) for kind, spans in found.items()
                 for _, start, end in spans), key=lambda e: (e[1], e[2]))
