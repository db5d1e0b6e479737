"""Task heads on the BERT encoder, one class per task.

The class for a task is found by naming convention: task
`"sequence_classification"` -> class `SequenceClassification` (see
`research.models.create_model`). To add a task, add a class here whose name is
the task in CamelCase, and its Hugging Face weight names in
`research.models.hf.head_key_map`.

Every head takes `(input_ids, attention_mask, token_type_ids=None, *,
segment_ids=None, rngs=None)` and returns float32 logits; `rngs=None` means
evaluation (no dropout); `segment_ids` marks packed rows (`BertModel`).
`SequenceClassification` also takes `example_starts` for packed rows and then
returns one row of logits per example.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from research.models.bert import ACTIVATIONS, BertConfig, BertModel, _dense, _layer_norm

TASKS = ("sequence_classification", "token_classification",
         "question_answering", "masked_lm")


class _Head(nnx.Module):
  """Shared constructor: the encoder and the dtype settings."""
  uses_pooler = False  # only sentence-level heads read the pooled [CLS]

  def __init__(self, cfg: BertConfig, num_labels: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl=None, remat=False,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.num_labels = num_labels
    self.bert = BertModel(cfg, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, remat=remat,
                          add_pooler=self.uses_pooler, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
    self.dtype, self.param_dtype = dtype, param_dtype

  def _layer_kw(self, rngs):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

  def _drop(self, x, rngs):
    return self.dropout(x, deterministic=rngs is None, rngs=rngs)


class SequenceClassification(_Head):
  """Logits [batch, num_labels] from the pooled [CLS] output, as BERT does.

  `num_labels == 1` is regression (STS-B): the single logit is the prediction.
  """
  uses_pooler = True

  def __init__(self, cfg, num_labels, **kw):
    super().__init__(cfg, num_labels, **kw)
    self.classifier = _dense(cfg, cfg.hidden_size, num_labels,
                             ("embed", None), **self._layer_kw(kw["rngs"]))

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               segment_ids=None, example_starts=None, rngs=None):
    _, pooled = self.bert(input_ids, attention_mask, token_type_ids,
                          segment_ids=segment_ids,
                          example_starts=example_starts, rngs=rngs)
    return self.classifier(self._drop(pooled, rngs)).astype(jnp.float32)


class TokenClassification(_Head):
  """Logits [batch, length, num_labels] per token (NER, POS tagging)."""

  def __init__(self, cfg, num_labels, **kw):
    super().__init__(cfg, num_labels, **kw)
    self.classifier = _dense(cfg, cfg.hidden_size, num_labels,
                             ("embed", None), **self._layer_kw(kw["rngs"]))

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               segment_ids=None, rngs=None):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids,
                     segment_ids=segment_ids, rngs=rngs)
    return self.classifier(self._drop(x, rngs)).astype(jnp.float32)


class QuestionAnswering(_Head):
  """Extractive QA: span (start_logits, end_logits), each [batch, length]."""

  def __init__(self, cfg, num_labels=2, **kw):
    super().__init__(cfg, 2, **kw)
    self.qa_outputs = _dense(cfg, cfg.hidden_size, 2, ("embed", None),
                             **self._layer_kw(kw["rngs"]))

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               segment_ids=None, rngs=None):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids,
                     segment_ids=segment_ids, rngs=rngs)
    logits = self.qa_outputs(x).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


class MaskedLM(_Head):
  """Logits [batch, length, vocab]; the decoder is tied to the word embeddings."""

  def __init__(self, cfg, num_labels=0, **kw):
    super().__init__(cfg, cfg.vocab_size, **kw)
    self.transform = _dense(cfg, cfg.hidden_size, cfg.hidden_size,
                            ("embed", None), **self._layer_kw(kw["rngs"]))
    self.transform_layer_norm = _layer_norm(cfg, **self._layer_kw(kw["rngs"]))
    self.decoder_bias = nnx.Param(
        jnp.zeros((cfg.vocab_size,), self.param_dtype),
        out_sharding=("vocab",), eager_sharding=False)
    self.activation = ACTIVATIONS[cfg.hidden_act]

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               segment_ids=None, rngs=None):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids,
                     segment_ids=segment_ids, rngs=rngs)
    x = self.transform_layer_norm(self.activation(self.transform(x)))
    logits = self.bert.embeddings.word_embeddings.attend(x)  # tied decoder
    return (logits + self.decoder_bias[...]).astype(jnp.float32)
