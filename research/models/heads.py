"""Task heads on the BERT encoder, one class per head.

The class for a task name is found by naming convention: task
`"sequence_classification"` -> class `SequenceClassification` (see
`research.models.head_class`); every function that takes a task name also
takes a head class. To add a head, add a class here (or anywhere: pass the
class) with its Hugging Face names: `hf_architecture` and `hf_key_map`.

Every head takes `(input_ids, attention_mask, token_type_ids=None, *,
rngs=None, **encoder_kw)` and returns float32 logits; `rngs=None` means
evaluation (no dropout). `encoder_kw` go to `BertModel.__call__`:
`segment_ids` and `example_starts` (packed rows; `SequenceClassification`
then returns one row of logits per example), `position_ids`,
`inputs_embeds` (then `input_ids` may be None), `prefix_kv`,
`sow_attention`. Every constructor takes `dense_factory` (see
`research.models.bert.make_dense`), used for the head's dense layers too,
and `pooling` (`research.models.pooling`: "pooler", "cls", "mean", "max"),
how a sentence-level head (`uses_pooler`) reads the encoder.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from research.models.bert import (ACTIVATIONS, BertConfig, BertModel, DenseFactory,
                                  HfKeyMap, _layer_norm, dense_builder,
                                  hf_layer_norm_keys, hf_linear_keys, make_dense)

TASKS = ("sequence_classification", "token_classification",
         "question_answering", "masked_lm", "pre_training",
         "sentence_embedding")


class Head(nnx.Module):
  """The base of every head: the encoder, the dtype settings, `_dense`.

  A head defined elsewhere (a test, a project) subclasses it, builds its
  layers with `self._dense(dense_factory, rngs)` and names its weights for
  Hugging Face below; every function that takes a task name takes the class.

  Hugging Face names, read by `research.models.hf` (as `BertFor*` /
  `RobertaFor*` classes carry theirs):
    hf_architecture: the class name after "Bert" / "Roberta" in config.json.
    hf_labels: config.json carries id2label / label2id (classification).
    hf_ignored: key suffixes in a checkpoint that hold no weights of their
      own, never reported as unused.
    hf_base_prefix(cfg): the encoder's prefix in the file ("bert.").
    hf_key_map(cfg): the head's own weights (may override encoder names).
  """
  # Sentence-level heads read a pooled vector (`pooling`); token-level
  # heads read every token and have no pooling.
  uses_pooler = False
  hf_architecture = ""
  hf_labels = False
  # Buffers, and the copies of tied weights that checkpoints with an MLM head
  # carry (decoder = word embeddings, decoder bias = the MLM bias).
  hf_ignored = BertModel.hf_ignored + (
      "predictions.decoder.weight", "predictions.decoder.bias",
      "lm_head.decoder.weight", "lm_head.decoder.bias")

  def __init__(self, cfg: BertConfig, num_labels: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl=None, remat=False,
               scan_layers=False, pooling: str = "pooler",
               dense_factory: DenseFactory = make_dense, rngs: nnx.Rngs):
    if not self.uses_pooler and pooling not in ("auto", "pooler"):
      raise ValueError(
          f"config.model.pooling={pooling!r}: {type(self).__name__} reads "
          "every token and pools nothing; pooling applies to sentence-level "
          "heads (leave it 'auto')")
    self.cfg = cfg
    self.num_labels = num_labels
    self.bert = BertModel(cfg, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, remat=remat,
                          scan_layers=scan_layers,
                          pooling=pooling if self.uses_pooler else None,
                          dense_factory=dense_factory, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
    self.dtype, self.param_dtype = dtype, param_dtype

  def _dense(self, dense_factory, rngs):
    """`dense_factory` with this model's dtypes bound (as the encoder's)."""
    return dense_builder(self.cfg, dense_factory, dtype=self.dtype,
                         param_dtype=self.param_dtype, rngs=rngs)

  def _classifier(self, dense_factory, rngs):
    """The `classifier` layer: hidden -> num_labels (named for HF's keys)."""
    return self._dense(dense_factory, rngs)(
        self.cfg.hidden_size, self.num_labels, kernel_axes=("embed", None),
        name="classifier")

  def _drop(self, x, rngs):
    return self.dropout(x, deterministic=rngs is None, rngs=rngs)

  @classmethod
  def hf_base_prefix(cls, cfg: BertConfig) -> str:
    """The encoder's name in `<Model>For*` files: "bert" or "roberta"."""
    return cfg.model_type

  @classmethod
  def hf_key_map(cls, cfg: BertConfig) -> HfKeyMap:
    """The head's Hugging Face names -> (path in this model, kind)."""
    raise NotImplementedError(f"{cls.__name__} has no Hugging Face names")


class _Classifier(Head):
  """A head whose layer on the encoder is `classifier` (hidden -> labels)."""

  def __init__(self, cfg, num_labels, *, dense_factory=make_dense, **kw):
    super().__init__(cfg, num_labels, dense_factory=dense_factory, **kw)
    self.classifier = self._classifier(dense_factory, kw["rngs"])


class SequenceClassification(_Classifier):
  """Logits [batch, num_labels] from the pooled output (BERT: the pooler).

  `num_labels == 1` is regression (STS-B): the single logit is the prediction.
  """
  uses_pooler = True
  hf_architecture = "ForSequenceClassification"
  hf_labels = True

  @classmethod
  def hf_key_map(cls, cfg):
    if cfg.model_type == "roberta":
      # RoBERTa's head is dense+tanh then out_proj: our pooler and classifier.
      return {**hf_linear_keys("classifier.dense", ("bert", "pooler")),
              **hf_linear_keys("classifier.out_proj", ("classifier",))}
    return hf_linear_keys("classifier", ("classifier",))

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               rngs=None, **encoder_kw):
    _, pooled = self.bert(input_ids, attention_mask, token_type_ids,
                          rngs=rngs, **encoder_kw)
    return self.classifier(self._drop(pooled, rngs)).astype(jnp.float32)


class TokenClassification(_Classifier):
  """Logits [batch, length, num_labels] per token (NER, POS tagging)."""
  hf_architecture = "ForTokenClassification"
  hf_labels = True

  @classmethod
  def hf_key_map(cls, cfg):
    return hf_linear_keys("classifier", ("classifier",))

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               rngs=None, **encoder_kw):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids, rngs=rngs,
                     **encoder_kw)
    return self.classifier(self._drop(x, rngs)).astype(jnp.float32)


class QuestionAnswering(Head):
  """Extractive QA: span (start_logits, end_logits), each [batch, length]."""
  hf_architecture = "ForQuestionAnswering"

  def __init__(self, cfg, num_labels=2, *, dense_factory=make_dense, **kw):
    super().__init__(cfg, 2, dense_factory=dense_factory, **kw)
    self.qa_outputs = self._dense(dense_factory, kw["rngs"])(
        cfg.hidden_size, 2, kernel_axes=("embed", None), name="qa_outputs")

  @classmethod
  def hf_key_map(cls, cfg):
    return hf_linear_keys("qa_outputs", ("qa_outputs",))

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               rngs=None, **encoder_kw):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids, rngs=rngs,
                     **encoder_kw)
    logits = self.qa_outputs(x).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


class MaskedLM(Head):
  """Logits [batch, length, vocab]; the decoder is tied to the word embeddings.

  `masked_positions` [batch, P] (sparse prediction, Cramming / BERT's
  original `max_predictions_per_seq`): the encoder's outputs at those
  positions only go through the transform and the decoder, giving logits
  [batch, P, vocab]. The decoder is a vocab x hidden matmul per token, the
  largest of a small BERT, so predicting the ~15% masked tokens only is most
  of a masked-LM step's saving.
  """
  hf_architecture = "ForMaskedLM"

  def __init__(self, cfg, num_labels=0, *, dense_factory=make_dense, **kw):
    super().__init__(cfg, cfg.vocab_size, dense_factory=dense_factory, **kw)
    self.transform = self._dense(dense_factory, kw["rngs"])(
        cfg.hidden_size, cfg.hidden_size, kernel_axes=("embed", None),
        name="transform")
    self.transform_layer_norm = _layer_norm(
        cfg, dtype=self.dtype, param_dtype=self.param_dtype, rngs=kw["rngs"])
    self.decoder_bias = nnx.Param(
        jnp.zeros((cfg.vocab_size,), self.param_dtype),
        out_sharding=("vocab",), eager_sharding=False)
    self.activation = ACTIVATIONS[cfg.hidden_act]

  @classmethod
  def hf_key_map(cls, cfg):
    if cfg.model_type == "roberta":
      hf, dense, norm = "lm_head", "lm_head.dense", "lm_head.layer_norm"
    else:
      hf, dense = "cls.predictions", "cls.predictions.transform.dense"
      norm = "cls.predictions.transform.LayerNorm"
    return {**hf_linear_keys(dense, ("transform",)),
            **hf_layer_norm_keys(norm, ("transform_layer_norm",)),
            f"{hf}.bias": (("decoder_bias",), "copy")}

  def tied_matmul_params(self) -> int:
    """Weights of the tied decoder (a matmul per token; `research.bench`)."""
    return self.cfg.vocab_size * self.cfg.hidden_size

  def mlm_logits(self, x):
    """Vocabulary logits [..., vocab] from hidden states x [..., hidden]."""
    x = self.transform_layer_norm(self.activation(self.transform(x)))
    logits = self.bert.embeddings.word_embeddings.attend(x)  # tied decoder
    return (logits + self.decoder_bias[...]).astype(jnp.float32)

  def token_logits(self, x, token_ids):
    """The logits of `token_ids` [U] only, from hidden states x [..., hidden].

    Equal to `mlm_logits(x)[..., token_ids]` without the [.., vocab]
    product: prompt-based classification reads a few label words at one
    position (`research/tasks/prompt.py`).
    """
    x = self.transform_layer_norm(self.activation(self.transform(x)))
    rows = self.bert.embeddings.word_embeddings.embedding[...][token_ids]
    logits = jnp.einsum("...h,uh->...u", x, rows.astype(x.dtype))
    return (logits + self.decoder_bias[...][token_ids]).astype(jnp.float32)

  def _mlm_logits_at(self, x, masked_positions):
    if masked_positions is not None:  # [B, L, H] -> [B, P, H]
      x = jnp.take_along_axis(x, masked_positions[..., None], axis=1)
    return self.mlm_logits(x)

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               masked_positions=None, rngs=None, **encoder_kw):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids, rngs=rngs,
                     **encoder_kw)
    return self._mlm_logits_at(x, masked_positions)


class PreTraining(MaskedLM):
  """BERT's pre-training heads: (MLM logits [B, L, vocab], NSP logits [B, 2]).

  The masked-LM head of `MaskedLM` plus next-sentence prediction on the
  pooled [CLS] output (`cls.seq_relationship`; class 0: B follows A, 1: B is
  random), as `BertForPreTraining`.
  """
  uses_pooler = True
  hf_architecture = "ForPreTraining"

  def __init__(self, cfg, num_labels=0, *, dense_factory=make_dense, **kw):
    super().__init__(cfg, num_labels, dense_factory=dense_factory, **kw)
    self.seq_relationship = self._dense(dense_factory, kw["rngs"])(
        cfg.hidden_size, 2, kernel_axes=("embed", None),
        name="seq_relationship")

  @classmethod
  def hf_key_map(cls, cfg):
    return {**super().hf_key_map(cfg),
            **hf_linear_keys("cls.seq_relationship", ("seq_relationship",))}

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               masked_positions=None, rngs=None, **encoder_kw):
    x, pooled = self.bert(input_ids, attention_mask, token_type_ids,
                          rngs=rngs, **encoder_kw)
    return (self._mlm_logits_at(x, masked_positions),
            self.seq_relationship(pooled).astype(jnp.float32))


class SentenceEmbedding(Head):
  """Mean-pooled token states, as sentence-transformers' Pooling module.

  Returns [batch, hidden], or with packed rows (`segment_ids`, and
  `example_starts` [batch, K] giving K) [batch, K, hidden]: one mean per
  example of the row (a contrastive pair is a row of two). No weights of its
  own; exported as a bare `BertModel`, which sentence-transformers loads.
  """
  hf_architecture = "Model"

  @classmethod
  def hf_base_prefix(cls, cfg):
    return ""  # BertModel files name the encoder's weights unprefixed

  @classmethod
  def hf_key_map(cls, cfg):
    return {}

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               rngs=None, segment_ids=None, example_starts=None,
               **encoder_kw):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids, rngs=rngs,
                     segment_ids=segment_ids, **encoder_kw)
    x = x.astype(jnp.float32)
    if segment_ids is None:
      weights = attention_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
      return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    k = example_starts.shape[1]
    # [B, L, K]: token l belongs to the row's example k (segment k + 1).
    member = (segment_ids[..., None] == jnp.arange(1, k + 1)).astype(x.dtype)
    sums = jnp.einsum("blk,blh->bkh", member, x)
    return sums / jnp.maximum(member.sum(1), 1.0)[..., None]
