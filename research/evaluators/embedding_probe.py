"""A logistic-regression head on sentence embeddings, fitted at each evaluation.

SetFit's second stage (Tunstall et al. 2022; setfit's default head): the
task's embeddings of its training sentences (`task.train_examples`, e.g.
`research/tasks/contrastive.py`) fit scikit-learn's `LogisticRegression`
(`C`, `max_iter`; setfit uses the defaults, C=1, 100 iterations), which then
labels this evaluator's split; the metrics are `research.metrics.common`
on those labels. With `normalize` the embeddings are L2-normalised first, as
all-MiniLM-L6-v2's Normalize module does in sentence-transformers. The task's
"predictions" on a sentence split must be its embeddings [B, hidden].
"""

from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils

from research import data, parallelism
from research.configs.plugins import ConfigError
from research.metrics import common as metrics_lib
from research.evaluators import common, sequence


def fit_head(train_x, train_y, C=1.0, max_iter=100, seed=0):  # pylint: disable=invalid-name
  """SetFit's head: scikit-learn's LogisticRegression on the embeddings."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  return LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(
      train_x, train_y)


class Evaluator(sequence.Evaluator):
  """See the module docstring."""
  CONFIG = {**common.Evaluator.CONFIG, "normalize": True, "C": 1.0,
            "max_iter": 100}

  def __init__(self, *, batcher, config, **kwargs):
    # Shortest first: the head and the metrics ignore order, and each batch
    # then pads to about its own width (sentence-transformers' `encode`
    # sorts too). Automatic widths fit those batches, at least 4 of them:
    # CR's test set pads to 0.44 real tokens with 2, 0.65 with 4; they
    # compile once per few-shot protocol, its test set being every split's.
    batcher = data.Batcher(
        batcher.split, batcher.batch_size, tuple(config.data.buckets),
        shuffle=False, num_buckets=max(4, len(batcher.buckets)),
        eval_order="length",
        process_index=batcher.process_index,
        process_count=batcher.process_count)
    super().__init__(batcher=batcher, config=config, **kwargs)

  def _embed(self, batcher, params, frozen):
    """(embeddings [n, hidden], labels [n], weights [n]) of a batcher's split."""
    batches = parallelism.prefetch(batcher.eval_batches(), self.sharding,
                                   self.config.parallelism.prefetch)
    emb, labels, weights = [], [], []
    for index, (host, batch) in enumerate(batches):
      del host
      # Global arrays -> numpy on every host, as `common.Evaluator.outputs`.
      out = multihost_utils.process_allgather(
          self.step(params, frozen, batch, index), tiled=True)
      real = out["batch_weights"] > 0
      emb.append(np.asarray(out["predictions"], np.float32)[real])
      labels.append(out["labels"][real])
      weights.append(out["batch_weights"][real])
    emb = np.concatenate(emb)
    if emb.ndim != 2:
      raise ConfigError(f"config.evals.{self.name}: the embedding_probe "
                        f"evaluator needs embeddings [n, hidden] as the task's "
                        f"predictions; task {self.task.name!r} gives shape "
                        f"{emb.shape}")
    if self.options["normalize"]:
      emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True),
                             1e-12)
    return emb, np.concatenate(labels), np.concatenate(weights)

  def run(self, params, frozen):
    if not self.split.has_labels:
      return {}
    fit_split = getattr(self.task, "train_examples", None)
    if fit_split is None:
      raise ConfigError(
          f"config.evals.{self.name}: the embedding_probe evaluator fits its "
          f"head on the task's training sentences; task {self.task.name!r} "
          "has none (task contrastive keeps them when it loads a training "
          "split)")
    fit = data.Batcher(fit_split, self.batcher.batch_size,
                       self.batcher.buckets, shuffle=False,
                       eval_order="length",
                       process_index=self.batcher.process_index,
                       process_count=self.batcher.process_count)
    train_x, train_y, _ = self._embed(fit, params, frozen)
    x, y, w = self._embed(self.batcher, params, frozen)
    keep = y >= 0
    head = fit_head(train_x, train_y, self.options["C"],
                    self.options["max_iter"], self.config.seed)
    predictions = head.predict(x[keep])
    return metrics_lib.compute(self.metric_names(self.config, self.options),
                               predictions, y[keep], w[keep])
