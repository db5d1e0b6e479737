"""Sentence pooling: how a sentence-level head reads the encoder's tokens.

`config.model.pooling` (every head with `uses_pooler`: sequence
classification and regression, BERT pre-training's next-sentence head):

  pooler  BERT's pooler: the [CLS] token's final state through dense + tanh
          (Devlin et al. 2018; Hugging Face's `BertForSequenceClassification`);
  cls     the [CLS] token's final state, without the pooler;
  mean    the mean over the real tokens (attention_mask 1; [CLS] and [SEP]
          included, as sentence-transformers' `Pooling` averages them);
  max     the element-wise max over the real tokens;
  auto    the checkpoint's own: a sentence-transformers directory's
          `Pooling` module (`modules.json`, else `1_Pooling/config.json`),
          otherwise `pooler`.

Why `auto` matters: a sentence-transformers model such as the packaged
all-MiniLM-L6-v2 was trained through mean pooling; its BERT pooler was never
trained, and a head that reads it starts from a near-constant input (a
linear probe on the frozen pooler reaches CoLA MCC 0.05 against 0.13 on
mean-pooled states: `benchmarks/pooler_probe.py`).

Packed rows (`segment_ids`, `example_starts`; research/data/batching.py)
pool each example over its own tokens.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp

POOLINGS = ("pooler", "cls", "mean", "max")
CHOICES = ("auto",) + POOLINGS
# sentence-transformers' Pooling modes (config.json: the `pooling_mode`
# string of sentence-transformers >= 5.x, or the older booleans
# `pooling_mode_<mode>`) -> ours. Others (mean_sqrt_len_tokens,
# weightedmean, lasttoken) have no counterpart here.
ST_MODES = {"cls": "cls", "cls_token": "cls", "mean": "mean",
            "mean_tokens": "mean", "max": "max", "max_tokens": "max"}
ST_POOLING_TYPE = "sentence_transformers.models.Pooling"


class PoolingError(ValueError):
  """A pooling name or a checkpoint's pooling config that cannot be used."""


def checkpoint_pooling(model_dir) -> str | None:
  """The pooling a sentence-transformers checkpoint declares, or None.

  Reads `modules.json` for the Pooling module's folder (`1_Pooling` when
  there is no `modules.json`) and its `config.json`.

  Raises:
    PoolingError: a declared mode with no counterpart here, or several
      modes at once (concatenated), naming the file.
  """
  root = pathlib.Path(model_dir)
  folder = root / "1_Pooling"
  modules = root / "modules.json"
  if modules.is_file():
    try:
      entries = json.loads(modules.read_text())
    except json.JSONDecodeError as e:
      raise PoolingError(f"{modules}: not valid JSON ({e})") from None
    found = [m for m in entries if str(m.get("type", "")).endswith(".Pooling")]
    if not found:
      return None
    folder = root / found[0].get("path", "1_Pooling")
  path = folder / "config.json"
  if not path.is_file():
    return None
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise PoolingError(f"{path}: not valid JSON ({e})") from None
  if "pooling_mode" in raw:
    given = raw["pooling_mode"]
    modes = [given] if isinstance(given, str) else list(given)
  else:
    modes = [k[len("pooling_mode_"):] for k, v in raw.items()
             if k.startswith("pooling_mode_") and v is True]
  if len(modes) != 1 or modes[0] not in ST_MODES:
    raise PoolingError(
        f"{path}: pooling {modes!r} has no counterpart here (supported: "
        f"{', '.join(sorted(set(ST_MODES)))}, one at a time); set "
        f"config.model.pooling to one of {', '.join(POOLINGS)}")
  return ST_MODES[modes[0]]


def resolve(pooling: str, model_dir=None) -> str:
  """`pooling` checked, with `auto` made the checkpoint's own (or pooler).

  Args:
    pooling: one of `CHOICES`.
    model_dir: the checkpoint directory, or None (a model from scratch).

  Raises:
    PoolingError: an unknown name, or a checkpoint's mode we cannot run.
  """
  if pooling not in CHOICES:
    raise PoolingError(f"config.model.pooling={pooling!r}; valid: "
                       f"{', '.join(CHOICES)}")
  if pooling != "auto":
    return pooling
  found = checkpoint_pooling(model_dir) if model_dir is not None else None
  return found or "pooler"


def pool(x, attention_mask, pooling: str, *, segment_ids=None,
         example_starts=None):
  """Sentence vectors from the token states (before any pooler dense).

  Args:
    x: [batch, length, hidden] final token states.
    attention_mask: [batch, length], 1 = real token.
    pooling: one of `POOLINGS`; `pooler` and `cls` take the first token (the
      pooler's dense + tanh is the encoder's to apply).
    segment_ids: packed rows: [batch, length] (k = the row's k-th example,
      0 = padding).
    example_starts: packed rows: [batch, K], each example's first token.

  Returns:
    [batch, hidden], or [batch * K, hidden] for packed rows (row-major); a
    packed slot without an example pools to zeros. Mean and max are computed
    in float32 and returned in x's dtype.
  """
  if pooling in ("pooler", "cls"):
    if example_starts is None:
      return x[:, 0]
    first = jnp.take_along_axis(x, example_starts[:, :, None], axis=1)
    return first.reshape(-1, x.shape[-1])
  if pooling not in ("mean", "max"):
    raise PoolingError(f"pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
  real = attention_mask.astype(bool)
  if segment_ids is None:
    masks = real[:, None, :]  # [batch, 1, length]
  else:  # [batch, K, length]: example k's tokens
    k = jnp.arange(1, example_starts.shape[1] + 1)
    masks = (segment_ids[:, None, :] == k[None, :, None]) & real[:, None, :]
  h = x.astype(jnp.float32)
  if pooling == "mean":
    weights = masks.astype(jnp.float32)
    total = jnp.einsum("bkl,blh->bkh", weights, h)
    out = total / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
  else:
    # The max over real tokens only; an empty slot gives zeros, not -inf.
    out = jnp.where(masks[..., None], h[:, None], -jnp.inf).max(axis=2)
    out = jnp.where(masks.any(-1)[..., None], out, 0.0)
  return out.reshape(-1, x.shape[-1]).astype(x.dtype)
