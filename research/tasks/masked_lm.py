"""Masked language modelling: BERT's pre-training objective on raw text.

Rows hold one text (or a pair): `config.data.text_fields`, no label column.
Masking is dynamic (RoBERTa's): a `transform` in the jitted step picks
`mask_probability` of each batch's real, non-special tokens with the key
`fold_in(fold_in(key(seed), step), steps.TRANSFORM_STREAM)`; of those, 80%
become [MASK], 10% a random token, 10% stay (Devlin et al., 2018). The key is
a function of the seed and the step, so a resumed run masks exactly as an
uninterrupted one; evaluation uses fixed keys per batch, the same at every
evaluation. Labels are the original ids at the chosen positions (-100
elsewhere).

Why in the step and not on the host: masking is a few element-wise ops on
[B, L] that cost nothing on an accelerator, while the host's Python batch
pipeline is what keeps up with it; JAX's keys need no generator state to
checkpoint; and the masks do not depend on how the global batch is split
over hosts (`jax_threefry_partitionable`).

Loss: cross-entropy per masked token. Evaluated by the `token` evaluator:
masked-token `accuracy` and `perplexity` (exp of the loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from research.configs.plugins import ConfigError
from research.data.splits import TokenizedSplit, select, text_fields
from research.tasks import common

IGNORE = -100


class Task(common.Task):
  """See the module docstring."""
  HEAD = "masked_lm"
  EVALUATOR = "token"
  CONFIG = {"mask_probability": 0.15}

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields()
    if not 0 < self.options["mask_probability"] < 1:
      raise ConfigError(
          "config.task_options.mask_probability="
          f"{self.options['mask_probability']} must be in (0, 1)")

  def columns(self):
    return {**super().columns(), "label_field": ""}  # texts only

  def num_outputs(self):
    return 0  # the head's outputs are the vocabulary

  def finish(self, name, enc, names, training):
    del names, training
    offsets, tokens, _, rows, _ = select(enc, np.ones(len(enc), bool))
    split = TokenizedSplit(
        name=name, where=enc.where, offsets=offsets, arrays=tokens,
        fields=text_fields(self.pad_id), rows=rows,
        max_length=self.config.data.max_length, has_labels=True)
    return split, dict(enc.skipped)

  def transform(self, batch, key):
    """Dynamic masking: new input_ids and labels (see the module docstring)."""
    if self.tokenizer is None:
      raise ValueError("task masked_lm needs the tokenizer (tasks.load(config, "
                       "tokenizer)) for its [MASK] id and vocabulary")
    ids = batch["input_ids"]
    special = jnp.asarray(sorted(set(self.tokenizer.all_special_ids)), ids.dtype)
    candidates = (batch["attention_mask"] > 0) & ~jnp.isin(ids, special)
    choose, how, which = jax.random.split(key, 3)
    masked = candidates & jax.random.bernoulli(
        choose, self.options["mask_probability"], ids.shape)
    r = jax.random.uniform(how, ids.shape)
    random_ids = jax.random.randint(which, ids.shape, 0, len(self.tokenizer),
                                    ids.dtype)
    new = jnp.where(masked & (r < 0.8), self.tokenizer.mask_token_id,
                    jnp.where(masked & (r < 0.9), random_ids, ids))
    return {**batch, "input_ids": new,
            "labels": jnp.where(masked, ids, IGNORE)}

  def loss(self, logits, batch):
    """Cross-entropy per masked token [B, L] (weight 0 elsewhere)."""
    return self.token_cross_entropy(logits, batch, IGNORE)

  def predict(self, logits, batch):
    """The most likely token at every position [B, L]."""
    del batch
    return jnp.argmax(logits, axis=-1)

  def default_evals(self, split_names):
    return {name: {"type": "token", "split": name,
                   "metrics": ("accuracy", "perplexity")}
            for name in split_names}
