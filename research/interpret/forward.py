"""Inputs for interpretation, and the model's forward pass with attention.

Everything runs through the model itself: `forward` and `attention_maps`
call the encoder with `sow_attention=True` (each `SelfAttention` sows its
probabilities, collected with `nnx.capture`), and attributions call the model
with `inputs_embeds` (research/interpret/attribution.py). There is no second
implementation of the forward pass to keep in step with `research/models`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.bert import BertModel, stack_attention
from research.models.heads import SequenceClassification


@dataclasses.dataclass(frozen=True)
class Inputs:
  """One tokenised example (no batch axis).

  Attributes:
    input_ids: int32 [t].
    attention_mask: int32 [t], 1 for real tokens, 0 for padding.
    token_type_ids: int32 [t], segment ids (0 for a single text).
    tokens: the t token strings, for display.
    mask_token_id: the tokenizer's [MASK] id, for the "mask" baseline.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray
  tokens: tuple[str, ...]
  mask_token_id: int | None = None

  @classmethod
  def from_ids(cls, input_ids, attention_mask=None, token_type_ids=None,
               tokens=None, mask_token_id=None) -> "Inputs":
    """Builds inputs from id arrays; tokens default to the ids as strings."""
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 1:
      raise ValueError(f"input_ids must be one example [t], got shape {ids.shape}")
    mask = (np.ones_like(ids) if attention_mask is None
            else np.asarray(attention_mask, np.int32))
    types = (np.zeros_like(ids) if token_type_ids is None
             else np.asarray(token_type_ids, np.int32))
    tokens = tuple(str(i) for i in ids) if tokens is None else tuple(tokens)
    if not mask.shape == types.shape == ids.shape or len(tokens) != len(ids):
      raise ValueError("input_ids, attention_mask, token_type_ids and tokens "
                       "must have the same length")
    return cls(ids, mask, types, tokens, mask_token_id)

  @property
  def batch(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(input_ids, attention_mask, token_type_ids), each [1, t]."""
    return tuple(jnp.asarray(a)[None] for a in (
        self.input_ids, self.attention_mask, self.token_type_ids))


def encode(tokenizer, text: str, text_pair: str | None = None, *,
           max_length: int = 128, pad_to: int | None = None) -> Inputs:
  """Tokenises one text (or pair) as the training pipeline does.

  Args:
    tokenizer: a Hugging Face tokenizer (`research.data.load_tokenizer`).
    text: the first text.
    text_pair: the optional second text (segment 1).
    max_length: truncation length, special tokens included.
    pad_to: pad with [PAD] (attention_mask 0) to this length, e.g. to see
      that padding gets no attention and no attribution.

  Returns:
    `Inputs` with the token strings.
  """
  enc = tokenizer(text, text_pair, truncation=True, max_length=max_length,
                  return_token_type_ids=True)
  ids = list(enc["input_ids"])
  mask = list(enc["attention_mask"])
  types = list(enc["token_type_ids"])
  if pad_to is not None:
    if len(ids) > pad_to:
      raise ValueError(f"the text has {len(ids)} tokens, more than "
                       f"pad_to={pad_to}")
    extra = pad_to - len(ids)
    ids += [tokenizer.pad_token_id] * extra
    mask += [0] * extra
    types += [0] * extra
  return Inputs.from_ids(ids, mask, types, tokenizer.convert_ids_to_tokens(ids),
                         tokenizer.mask_token_id)


@dataclasses.dataclass(frozen=True)
class Trace:
  """What `forward` returns (a batch of b examples of length t).

  Attributes:
    hidden: [b, t, hidden] the encoder's sequence output.
    attentions: float32 [b, layers, heads, t (query), t (key)] probabilities;
      each row sums to 1 over the real keys and is exactly 0 on padding.
    pooled: [b, hidden] tanh(pooler([CLS])), or None without a pooler.
    logits: float32 [b, num_labels] for a `SequenceClassification` model,
      else None.
  """
  hidden: jax.Array
  attentions: jax.Array
  pooled: jax.Array | None
  logits: jax.Array | None


def encoder_of(model: nnx.Module) -> BertModel:
  """The `BertModel` of a head model (or the model itself)."""
  return model if isinstance(model, BertModel) else model.bert


def word_embeddings(model: nnx.Module, input_ids) -> jax.Array:
  """The word embeddings [..., t, hidden] of token ids (what attributions use)."""
  return encoder_of(model).embeddings.word_embeddings(jnp.asarray(input_ids))


def forward(model: nnx.Module, input_ids, attention_mask, token_type_ids=None,
            position_ids=None, *, inputs_embeds=None) -> Trace:
  """The model's evaluation forward pass, with attention probabilities.

  Args:
    model: a head model from `research.models` (or a bare `BertModel`);
      logits are computed for `SequenceClassification`, attention maps for
      any of them.
    input_ids: int [b, t]; may be None when `inputs_embeds` is given.
    attention_mask: int [b, t], 1 = real token.
    token_type_ids: int [b, t] (default zeros).
    position_ids: int [b, t] (default as the model: `bert.position_ids`,
      which numbers RoBERTa's real tokens from pad_token_id + 1).
    inputs_embeds: [b, t, hidden] word embeddings to use instead of looking
      up `input_ids`; position and token-type embeddings are still added.

  Returns:
    A `Trace`.
  """
  def run(bert):
    return bert(None if input_ids is None else jnp.asarray(input_ids),
                jnp.asarray(attention_mask), token_type_ids, position_ids,
                inputs_embeds=inputs_embeds, sow_attention=True)

  (hidden, pooled), sown = nnx.capture(run, nnx.Intermediate)(encoder_of(model))
  logits = None
  if isinstance(model, SequenceClassification):
    # The head's own layer on the pooled output (its dropout is off here).
    logits = model.classifier(pooled).astype(jnp.float32)
  attentions = jnp.moveaxis(stack_attention(sown), 0, 1)  # [b, layers, ...]
  return Trace(hidden=hidden, attentions=attentions, pooled=pooled,
               logits=logits)


@nnx.jit
def _attentions(model, input_ids, attention_mask, token_type_ids):
  return forward(model, input_ids, attention_mask, token_type_ids).attentions


def attention_maps(model: nnx.Module, inputs: Inputs) -> np.ndarray:
  """Attention probabilities of every layer and head for one example.

  Args:
    model: any model from `research.models`.
    inputs: one example (`encode` or `Inputs.from_ids`).

  Returns:
    float32 [layers, heads, t (query), t (key)]; `maps[l, h, i, j]` is how
    much token i attends to token j in layer l, head h.
  """
  return np.asarray(_attentions(model, *inputs.batch)[0])
