"""The label set: resolving it, mapping raw labels to ids, saving it.

Order of precedence for the label names (the declared label set, in id order):
1. `data.label_names` (or names passed in, e.g. from a checkpoint's
   labels.json);
2. the source's own names (a TFDS / Hugging Face ClassLabel);
3. from the training split: integer labels are ids ("0".."num_labels-1");
   string labels are sorted and numbered.

A raw label maps to the id of the name equal to it. When no name looks like an
integer, an integer label is also accepted as an id (GLUE TSVs store "0"/"1"
under names such as "negative"/"positive"). "-1" that is not a name means
unlabeled: allowed in evaluation splits (id -1), a missing label in training.
"""

import json
import math

import numpy as np

from research.data import errors
from research.data.errors import DataError
from research.data.sources import UNLABELED


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(s):
  try:
    int(s)
    return True
  except ValueError:
    return False


def resolve_label_names(declared, source_names, train_labels, eval_labels,
                        num_labels):
  """Returns the label names in id order (empty for regression).

  Args:
    declared: `data.label_names` or names from labels.json; empty if none.
    source_names: a ClassLabel's names from the source, or None.
    train_labels: raw labels (strings) of the training split, or None.
    eval_labels: raw labels of the evaluation splits (used only when there is
      no training split), a list of string sequences.
    num_labels: `config.num_labels`; 1 means regression.

  Returns:
    A tuple of label names with `len == num_labels` (classification).

  Raises:
    DataError: when the label set does not match num_labels, or string labels
      cannot be numbered without a training split or declared names.
  """
  if num_labels == 1:
    return ()
  if declared:
    names, origin = tuple(str(n) for n in declared), "data.label_names"
  elif source_names:
    names, origin = tuple(source_names), "the dataset's label feature"
  else:
    seen = set(train_labels) if train_labels is not None else set()
    if train_labels is None:
      for labels in eval_labels:
        seen.update(labels)
    seen.discard(UNLABELED)
    if all(_is_int(s) for s in seen):
      names = tuple(str(i) for i in range(num_labels))
      origin = "integer labels (ids 0..num_labels-1)"
    elif train_labels is None:
      raise DataError(
          f"string labels {sorted(seen)[:10]} cannot be numbered without a "
          "training split: set data.label_names (the trainer saves them in "
          "labels.json)")
    else:
      names = tuple(sorted(str(s) for s in seen))  # Not np.str_: clean reprs.
      origin = "the training split's labels"
  if len(set(names)) != len(names):
    raise DataError(f"duplicate label names {list(names)} (from {origin})")
  if len(names) != num_labels:
    raise DataError(
        f"{len(names)} labels {list(names)} (from {origin}) but "
        f"num_labels={num_labels}: set num_labels={len(names)} or declare "
        "data.label_names")
  return names


def map_labels(raw, names, regression, policy, rows, training):
  """Maps raw labels to ids (int32) or values (float32).

  Args:
    raw: the raw labels (a sequence of strings).
    names: the label names in id order (empty for regression).
    regression: parse floats instead of looking up names.
    policy: the split's `errors.RowPolicy` (a bad label is a bad row).
    rows: the row numbers of `raw`, for messages.
    training: "-1" is then a missing label, not an unlabeled row.

  Returns:
    (labels, keep): the mapped labels of the kept rows, and a boolean mask
    over `raw` of the rows kept.
  """
  keep = np.ones(len(raw), bool)
  if regression:
    out = np.zeros(len(raw), np.float32)
  else:
    out = np.zeros(len(raw), np.int32)
    index = {n: i for i, n in enumerate(names)}
    ids_allowed = not any(_is_int(n) for n in names)
  # Map each distinct raw label once; report offending rows in file order.
  uniques, inverse = np.unique(np.asarray(raw, dtype=str), return_inverse=True)
  bad = []
  for u, value in enumerate(uniques.tolist()):  # Python str: clean reprs.
    problem = None
    if regression:
      try:
        mapped = float(value)
      except ValueError:
        mapped, problem = None, f"label {value!r} is not a number"
      if mapped is not None and not math.isfinite(mapped):
        problem = f"label {value!r} is not finite"
      elif mapped is not None and abs(mapped) > _FLOAT32_MAX:
        problem = f"label {value!r} overflows float32"  # It would become inf.
    elif value in index:
      mapped = index[value]
    elif value == UNLABELED:
      mapped = -1
      if training:
        problem = "the label is missing (-1) in a training split"
    elif ids_allowed and _is_int(value) and 0 <= int(value) < len(names):
      mapped = int(value)
    else:
      problem = (f"label {value!r} is not one of the valid labels "
                 f"{list(names)}")
    where = inverse == u
    if problem is None:
      out[where] = mapped
      continue
    reason = errors.MISSING_LABEL if value == UNLABELED else \
        errors.UNKNOWN_LABEL
    bad.extend((i, reason, problem) for i in np.flatnonzero(where))
  for i, reason, problem in sorted(bad):
    policy.bad(int(rows[i]), reason, problem)
    keep[i] = False
  return out[keep], keep


def map_token_labels(raw, names, policy, rows):
  """Maps per-token raw labels to ids; "" (no label) becomes -100.

  Args:
    raw: str [tokens], the raw label of each token ("" for none: special
      tokens, a word's later sub-tokens).
    names: the label names in id order.
    policy: the split's `errors.RowPolicy` (an unknown label is a bad row).
    rows: int [tokens], the source row of each token, for messages.

  Returns:
    (ids int32 [tokens], bad_rows): the ids (-100 where no label) and the
    sorted source rows reported bad (their features should be dropped).
  """
  out = np.full(len(raw), -100, np.int32)
  index = {n: i for i, n in enumerate(names)}
  ids_allowed = not any(_is_int(n) for n in names)
  uniques, inverse = np.unique(np.asarray(raw, dtype=str), return_inverse=True)
  bad = {}
  for u, value in enumerate(uniques.tolist()):
    if value == "":
      continue
    if value in index:
      mapped = index[value]
    elif ids_allowed and _is_int(value) and 0 <= int(value) < len(names):
      mapped = int(value)
    else:
      for row in np.unique(rows[inverse == u]).tolist():
        bad.setdefault(row, value)
      continue
    out[inverse == u] = mapped
  for row in sorted(bad):  # once per row, in file order
    policy.bad(row, errors.UNKNOWN_LABEL, f"label {bad[row]!r} is not one "
               f"of the valid labels {list(names)}")
  return out, sorted(bad)


def save_label_names(path, names):
  """Writes the label names (id order) as a JSON list, e.g. labels.json."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(list(names), f, ensure_ascii=False, indent=1)
    f.write("\n")


def load_label_names(path):
  """Reads names written by `save_label_names`; returns a tuple of str."""
  with open(path, encoding="utf-8") as f:
    names = json.load(f)
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise DataError(f"{path}: expected a JSON list of label names")
  return tuple(names)
