"""How much a sequence of models forgot, kept and gained.

`scores[t][j]`: the held-out score on data set j of the model after round t
(round 0: the model before any feedback). Lopez-Paz and Ranzato (2017),
"Gradient Episodic Memory for Continual Learning", define backward transfer
over tasks learned in order; Chaudhry et al. (2018) define forgetting as
the best earlier score minus the current one.
"""

from __future__ import annotations

import numpy as np


def forgetting(scores, j: int, t: int | None = None) -> float:
  """max over rounds k < t of scores[k][j], minus scores[t][j] (t: the last)."""
  s = np.asarray(scores, np.float64)
  t = len(s) - 1 if t is None else t
  if t < 1:
    return 0.0
  return float(s[:t, j].max() - s[t, j])


def backward_transfer(scores, learned_at) -> float:
  """Lopez-Paz and Ranzato's BWT of the last model.

  BWT = mean over data sets j learned before the last round of
  (scores[T][j] - scores[learned_at[j]][j]): negative when learning later
  rounds lowered what was learned earlier.

  Args:
    scores: [rounds + 1][data sets].
    learned_at: {j: the round after which data set j was learned}; data
      sets learned in the last round are left out (nothing came after).
  """
  s = np.asarray(scores, np.float64)
  last = len(s) - 1
  terms = [s[last, j] - s[t, j] for j, t in learned_at.items() if t < last]
  return float(np.mean(terms)) if terms else 0.0


def gain(scores, j: int) -> float:
  """scores[last][j] - scores[0][j]: what the rounds added on data set j."""
  s = np.asarray(scores, np.float64)
  return float(s[-1, j] - s[0, j])
