"""K-shot splits: K training and K development examples per class.

The protocol of LM-BFF (Gao, Fisch and Chen, 2021, "Making Pre-trained
Language Models Better Few-shot Learners"): from a task's full training set,
K examples per class form the training set and K other examples per class
the development set used for model selection (the "few-shot dev set", of
the same size, so that no more labels are used than a few-shot user has);
the task's original dev set is the test set. Five splits, seeds 13, 21, 42,
87 and 100; results are the mean and standard deviation over the splits.

`sample(labels, k, seed)` is a pure function of the labels, K and the seed:
one permutation of the rows from `numpy.random.default_rng(seed)`, then per
class the first K rows in that order are the training set and the next K the
development set (LM-BFF shuffles once with the seed and takes the first K
of each class the same way; its numpy generator differs, so its exact
splits are not reproduced).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from research.data.errors import DataError

# LM-BFF's five data seeds (Gao et al. 2021, section 3).
SEEDS = (13, 21, 42, 87, 100)


def sample(labels, k, seed, dev=True):
  """Row indices of a K-shot training and development set.

  Args:
    labels: the label of every row (strings or ints), [n].
    k: examples per class in each set.
    seed: the split's seed.
    dev: also draw the development set (K other rows per class).

  Returns:
    (train, dev): int64 arrays of row indices in the permuted order, K per
    class each (dev empty with `dev=False`); disjoint.

  Raises:
    DataError: a class with fewer than K (2K with `dev`) rows, naming it.
  """
  if k < 1:
    raise DataError(f"K={k}: the examples per class must be >= 1")
  labels = np.asarray([str(l) for l in labels])
  need = 2 * k if dev else k
  counts = collections.Counter(labels.tolist())
  short = {c: n for c, n in sorted(counts.items()) if n < need}
  if short:
    raise DataError(f"K={k}: a K-shot {'training and development set needs' if dev else 'training set needs'} "
                    f"{need} rows per class; these classes have fewer: "
                    f"{short}")
  order = np.random.default_rng(seed).permutation(len(labels))
  train, development = [], []
  for label in sorted(counts):
    rows = order[labels[order] == label]
    train.append(rows[:k])
    development.append(rows[k:need] if dev else rows[:0])
  return np.concatenate(train), np.concatenate(development)


def majority(labels) -> tuple[str, float]:
  """(the most frequent label, its share of the rows): the majority baseline."""
  counts = collections.Counter(str(l) for l in labels)
  label, count = max(sorted(counts.items()), key=lambda kv: kv[1])
  return label, count / max(1, sum(counts.values()))


def write_jsonl(path, raw, indices, text_fields, label_field):
  """Writes rows `indices` of a `RawSplit` as JSON lines.

  Each line holds the text columns, the label (its raw string) and `row`,
  the row's line or example number in the source.

  Returns:
    The path.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for i in indices:
      record = {name: raw.texts[j][i] for j, name in enumerate(text_fields)}
      if raw.labels is not None:
        record[label_field] = raw.labels[i]
      record["row"] = int(raw.rows[i])
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path
