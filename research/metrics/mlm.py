"""Masked-LM evaluation: accuracy and perplexity over the masked tokens.

Perplexity is exp of the mean cross-entropy over every masked token of the
evaluation set (not the mean of per-batch perplexities), so evaluation sums
per batch inside the jitted step and divides once at the end:

  totals = None
  for batch in eval_batches:
    logits = model(...)                                   # [B, L, V]
    totals = mlm.add(totals, mlm.sums(logits, batch["labels"]))  # on device
  metrics = mlm.metrics(totals)  # {"mlm_loss", "mlm_accuracy", "perplexity"}

Labels follow `research.data.masking`: the original id where a token was
masked, -100 elsewhere.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.data.masking import IGNORE


def sums(logits, labels):
  """Per-batch sums over the masked tokens; jittable.

  Args:
    logits: float [..., V] scores over the vocabulary (any float dtype: the
      loss is computed in float32).
    labels: int [...], -100 where a token is not predicted.

  Returns:
    {"loss": sum of cross-entropies, "correct": number of masked tokens whose
    arg-max is the label, "count": number of masked tokens}: scalars, the
    loss float32, the counts int32.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  predicted = labels != IGNORE
  safe = jnp.where(predicted, labels, 0)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  weight = predicted.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == safe) & predicted
  # Counts as int32: a float32 sum stops counting exactly at 2**24 tokens.
  return {"loss": jnp.sum(loss * weight),
          "correct": jnp.sum(correct, dtype=jnp.int32),
          "count": jnp.sum(predicted, dtype=jnp.int32)}


def add(totals, batch_sums):
  """Adds one batch's `sums` to running totals (None to start)."""
  if totals is None:
    return batch_sums
  return jax.tree.map(jnp.add, totals, batch_sums)


def metrics(totals):
  """Turns summed totals into the logged metrics.

  Args:
    totals: `sums` (or `add`ed sums) of an evaluation set.

  Returns:
    {"mlm_loss": mean masked-token cross-entropy, "mlm_accuracy",
    "perplexity": exp(mlm_loss), "masked_tokens": count} as Python floats.

  Raises:
    ValueError: no masked token at all (nothing to evaluate).
  """
  loss, correct, count = (float(np.asarray(totals[k]))
                          for k in ("loss", "correct", "count"))
  if count <= 0:
    raise ValueError("No masked tokens to evaluate: every label is -100 "
                     "(empty evaluation set, or masking chose nothing)")
  mean = loss / count
  return {"mlm_loss": mean, "mlm_accuracy": correct / count,
          "perplexity": math.exp(mean), "masked_tokens": count}


def evaluate(logits, labels):
  """`metrics(sums(logits, labels))` for arrays that fit in memory at once."""
  return metrics(sums(logits, labels))
