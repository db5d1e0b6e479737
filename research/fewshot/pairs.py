"""SetFit's contrastive sentence pairs from a small labelled set.

Tunstall et al. (2022), "Efficient Few-Shot Learning Without Prompts": every
pair of training sentences (with replacement, so a sentence with itself too)
is positive when the labels agree (target cosine 1) and negative otherwise
(target 0). The `setfit` package's default `sampling_strategy`,
"oversampling", repeats the rarer kind until there are as many positive as
negative pairs, and yields them alternately (setfit 1.2,
`sampler.ContrastiveDataset`); "undersampling" cuts the commoner kind,
"unique" keeps every pair once; `num_iterations` > 0 instead asks for
that many positive and as many negative pairs per sentence (SetFit's
first releases). The pairs are shuffled by `seed` (setfit: a fixed seed 42
of numpy's legacy generator, so the orders differ).
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("oversampling", "undersampling", "unique")


def contrastive_pairs(labels, seed, strategy="oversampling",
                      num_iterations=0):
  """The pairs SetFit trains on, positives and negatives balanced.

  Args:
    labels: the label of each sentence, [n].
    seed: the shuffle's seed.
    strategy: one of STRATEGIES.
    num_iterations: > 0: `num_iterations * n` positive pairs and as many
      negative ones (overrides `strategy`).

  Returns:
    (first, second, same): int64 [pairs] sentence indices and float32
    [pairs] targets (1.0: same label), positive and negative alternating
    (the balanced strategies: exactly as many of each).

  Raises:
    ValueError: an unknown strategy, or a kind of pair that cannot be made
      (one label only: no negatives; every label once: no positives apart
      from self-pairs, which always exist).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"pair sampling strategy {strategy!r}; valid: "
                     f"{', '.join(STRATEGIES)}")
  labels = np.asarray([str(l) for l in labels])
  n = len(labels)
  first, second = np.triu_indices(n, 0)  # with replacement: (i, i) too
  order = np.random.default_rng(seed).permutation(len(first))
  first, second = first[order], second[order]
  same = labels[first] == labels[second]
  pos = np.stack([first[same], second[same]], 1)
  neg = np.stack([first[~same], second[~same]], 1)
  if not len(neg):
    raise ValueError(f"contrastive pairs need two labels or more; all {n} "
                     f"sentences are labelled {labels[0]!r}")
  if num_iterations > 0:
    n_pos = n_neg = num_iterations * n
  elif strategy == "unique":
    n_pos, n_neg = len(pos), len(neg)
  elif strategy == "oversampling":
    n_pos = n_neg = max(len(pos), len(neg))
  else:
    n_pos = n_neg = min(len(pos), len(neg))
  # Cycled to the count (setfit restarts its list), then alternated.
  pos = pos[np.arange(n_pos) % len(pos)]
  neg = neg[np.arange(n_neg) % len(neg)]
  both = min(n_pos, n_neg)
  pairs = np.concatenate([np.stack([pos[:both], neg[:both]], 1).reshape(-1, 2),
                          pos[both:], neg[both:]])
  targets = np.concatenate([np.tile(np.float32([1.0, 0.0]), both),
                            np.ones(n_pos - both, np.float32),
                            np.zeros(n_neg - both, np.float32)])
  return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), targets
