"""Sequence classification (GLUE, reviews) and regression (STS-B).

One text or a text pair per example, one label: a class, or with
`config.num_labels == 1` a real value (regression, squared error; the
single logit is the prediction). The head is BERT's: the pooled [CLS]
through a linear layer. Trains on packed rows (`data.examples_per_row`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from research.data import labels as labels_lib
from research.data.errors import DataError, RowPolicy
from research.data.splits import TokenizedSplit, select
from research.tasks import common
from research.models import heads


class Task(common.Task):
  """See the module docstring."""
  HEAD = heads.SequenceClassification
  EVALUATOR = "sequence"
  PACKING = True
  EXPLAINABLE = True

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields()

  @property
  def regression(self) -> bool:
    return self.config.num_labels == 1

  def finish(self, name, enc, names, training):
    """Maps labels to ids (or floats), drops rows with bad labels."""
    data = self.config.data
    policy = RowPolicy(data.bad_rows, enc.where, enc.unit)
    n = len(enc)
    if enc.labels is None:
      label_ids = np.full(n, -1, np.float32 if self.regression else np.int32)
      keep = np.ones(n, bool)
    else:
      label_ids, keep = labels_lib.map_labels(
          enc.labels, names, self.regression, policy, enc.rows, training)
    if not keep.any():
      raise DataError(f"{enc.where}: no usable rows (skipped: "
                      f"{dict(policy.counts)})")
    offsets, tokens, _, rows, _ = select(enc, keep)
    split = TokenizedSplit.sequence(
        name=name, where=enc.where, input_ids=tokens["input_ids"],
        token_type_ids=tokens["token_type_ids"], offsets=offsets,
        labels=label_ids, rows=rows, max_length=data.max_length,
        has_labels=enc.labels is not None and bool((label_ids != -1).any()),
        pad_id=self.pad_id, label_names=names)
    return split, self.skipped(enc, policy)

  def loss(self, logits, batch):
    """Cross-entropy (squared error for regression) per example.

    An unlabeled example (-1) of a classification split has weight 0.
    """
    labels = batch["labels"]
    if self.regression:
      return jnp.square(logits[:, 0] - labels), batch["weights"]
    weights = batch["weights"] * (labels >= 0)
    return (optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.maximum(labels, 0)), weights)

  def predict(self, logits, batch):
    """Class ids [B], or the regression output [B]."""
    del batch
    return logits[:, 0] if self.regression else jnp.argmax(logits, axis=-1)

  def distributions(self, logits, batch):
    """One distribution per example [B, C] (a regression output: C = 1)."""
    return [(logits, batch["weights"])]

  def serve_result(self, outputs, features, label_names):
    """{"label", "label_id", "probabilities"}; regression: {"score"}."""
    del features
    logits = np.asarray(outputs[0], np.float64)  # [num_labels], one row
    if self.regression:
      return {"score": float(logits[0])}
    probabilities = common.softmax(logits)
    names = [str(n) for n in label_names] or [
        str(i) for i in range(len(logits))]
    best = int(np.argmax(logits))  # `predict`'s choice
    return {"label": names[best], "label_id": best,
            "probabilities": dict(zip(names, probabilities.tolist()))}
