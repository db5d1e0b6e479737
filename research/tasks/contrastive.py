"""Contrastive sentence-pair fine-tuning of a sentence encoder (SetFit).

Tunstall et al. (2022), "Efficient Few-Shot Learning Without Prompts": the
encoder (mean-pooled token states, sentence-transformers' embedding; head
`SentenceEmbedding`) is fine-tuned on pairs of training sentences, positive
when their labels agree and negative otherwise (`research.fewshot.pairs`:
SetFit's sampling, positives and negatives balanced), with SetFit's default
`CosineSimilarityLoss`: the squared difference between the pair's cosine
similarity and its target (1 or 0). A classifier on the embeddings then
labels sentences: the `embedding_probe` evaluator fits SetFit's head, a
logistic regression, on the training sentences' embeddings and scores each
evaluation split, so checkpoint selection and early stopping work as for
any task.

The training split's rows are read and featurised as sentences (one text or
a pair, as sequence classification reads them); `finish` makes the pairs,
each one feature of two packed examples (`segment_ids` 1 and 2,
`example_starts`: block-diagonal attention and positions restarting, so each
sentence is encoded exactly as alone), and keeps the sentences as
`train_examples` for the head. Evaluation splits stay sentences, whose
"predictions" are their embeddings.

Options: `sampling` (oversampling | undersampling | unique) and
`num_iterations` (> 0: that many positive and negative pairs per sentence)
as in setfit's TrainingArguments; `pair_seed` (-1: config.seed) shuffles
the pairs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from research.configs.plugins import ConfigError
from research.data import labels as labels_lib
from research.data.errors import DataError, RowPolicy
from research.data.splits import Field, TokenizedSplit, select, text_fields
from research.fewshot import pairs as pairs_lib
from research.models import heads
from research.tasks import common


def cosine(u, v):
  """Cosine similarity of the rows of u and v [..., hidden]."""
  dot = (u * v).sum(-1)
  norms = jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(v, axis=-1)
  return dot / jnp.maximum(norms, 1e-12)


class Task(common.Task):
  """See the module docstring."""
  HEAD = heads.SentenceEmbedding
  EVALUATOR = "embedding_probe"
  CONFIG = {"sampling": "oversampling", "num_iterations": 0, "pair_seed": -1}

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields()
    if self.options["sampling"] not in pairs_lib.STRATEGIES:
      raise ConfigError(
          f"config.task_options.sampling={self.options['sampling']!r}; "
          f"valid: {', '.join(pairs_lib.STRATEGIES)}")
    self.train_examples = None  # the training sentences (`finish`)

  def num_outputs(self):
    return 0  # an embedding, no classes

  def finish(self, name, enc, names, training):
    """Sentences with label ids; the training split becomes pairs."""
    data = self.config.data
    policy = RowPolicy(data.bad_rows, enc.where, enc.unit)
    n = len(enc)
    if enc.labels is None:
      label_ids, keep = np.full(n, -1, np.int32), np.ones(n, bool)
    else:
      label_ids, keep = labels_lib.map_labels(
          enc.labels, names, False, policy, enc.rows, training)
    if not keep.any():
      raise DataError(f"{enc.where}: no usable rows (skipped: "
                      f"{dict(policy.counts)})")
    offsets, tokens, _, rows, _ = select(enc, keep)
    sentences = TokenizedSplit.sequence(
        name=name, where=enc.where, input_ids=tokens["input_ids"],
        token_type_ids=tokens["token_type_ids"], offsets=offsets,
        labels=label_ids, rows=rows, max_length=data.max_length,
        has_labels=enc.labels is not None and bool((label_ids != -1).any()),
        pad_id=self.pad_id, label_names=names)
    if training:
      self.train_examples = sentences
      sentences = self.pair_split(sentences)
    return sentences, self.skipped(enc, policy)

  def pair_split(self, sentences):
    """The contrastive pairs of a sentence split, one packed row each."""
    o = self.options
    try:
      first, second, targets = pairs_lib.contrastive_pairs(
          sentences.labels,
          self.config.seed if o["pair_seed"] < 0 else o["pair_seed"],
          o["sampling"], o["num_iterations"])
    except ValueError as e:
      raise DataError(f"{sentences.where}: {e}") from None
    starts, lengths = sentences.offsets[:-1], sentences.lengths
    # Token indices of each pair: sentence a's tokens, then b's.
    index = np.concatenate([np.r_[starts[a]:starts[a] + lengths[a],
                                  starts[b]:starts[b] + lengths[b]]
                            for a, b in zip(first, second)])
    segment = np.concatenate([np.repeat(np.int32([1, 2]),
                                        [lengths[a], lengths[b]])
                              for a, b in zip(first, second)])
    offsets = np.zeros(len(first) + 1, np.int64)
    np.cumsum(lengths[first] + lengths[second], out=offsets[1:])
    return TokenizedSplit(
        name=sentences.name, where=sentences.where, offsets=offsets,
        arrays={"input_ids": sentences.input_ids[index],
                "token_type_ids": sentences.token_type_ids[index],
                "segment_ids": segment,
                "example_starts": np.stack(
                    [np.zeros_like(first), lengths[first]], 1).astype(
                        np.int32),
                "labels": targets},
        fields=text_fields(self.pad_id) + (
            Field("segment_ids", True, np.int32, 0),
            Field("example_starts", False, np.int32, 0),
            Field("labels", False, np.float32, 0)),
        rows=sentences.rows[first], max_length=2 * sentences.max_length,
        has_labels=True, label_names=sentences.label_names)

  def loss(self, outputs, batch):
    """Pairs [B, 2, hidden]: (cos(u, v) - target)^2 per pair (SetFit's
    CosineSimilarityLoss). Sentences [B, hidden]: no loss (weight 0)."""
    if outputs.ndim == 2:
      return jnp.zeros(outputs.shape[0]), jnp.zeros_like(batch["weights"])
    return (jnp.square(cosine(outputs[:, 0], outputs[:, 1]) - batch["labels"]),
            batch["weights"])

  def predict(self, outputs, batch):
    """Sentences: their embeddings [B, hidden]; pairs: the cosine [B]."""
    del batch
    return outputs if outputs.ndim == 2 else cosine(outputs[:, 0],
                                                    outputs[:, 1])
