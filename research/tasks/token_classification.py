"""Token classification: one label per word (NER, POS tagging, chunking).

Rows hold pre-split words and one tag per word (CoNLL-2003 style: JSON
lines `{"tokens": ["EU", "rejects", ...], "ner_tags": ["B-ORG", "O", ...]}`,
or TFDS / Hugging Face datasets whose tags are a sequence of ClassLabels;
`config.data.text_fields = ("tokens",)`, `config.data.label_field =
"ner_tags"`). Words are tokenised with the fast tokenizer's word alignment
(`is_split_into_words`): a word's first sub-token carries its tag, the
others and the special tokens are ignored (-100, weight 0), as in BERT's
NER setup and Hugging Face's `run_ner`; `label_all_subtokens` gives every
sub-token its word's tag instead. Words past `data.max_length` tokens are
truncated away (their tags are not scored).

Loss: cross-entropy per labelled token. Predictions: a class per token,
scored per word by the `token` evaluator (token accuracy, entity-level F1).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from research.data import errors
from research.data import labels as labels_lib
from research.data import tokenize
from research.data.errors import RowPolicy
from research.data.sources import label_str
from research.data.splits import Field, TokenizedSplit, select, text_fields
from research.tasks import common

IGNORE = -100
_CHUNK = 4096  # rows per tokenizer call


class Task(common.Task):
  """See the module docstring."""
  HEAD = "token_classification"
  EVALUATOR = "token"
  WORDS = True
  LABEL_JSON = True
  CONFIG = {"label_all_subtokens": False}

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields((1,), "one column of words, e.g. ('tokens',)")

  def featurize(self, raw, tokenizer, max_length, policy):
    """Sub-tokens of each row's words, the raw tag of each sub-token."""
    words = raw.texts[0]
    tags = None
    keep = np.ones(len(words), bool)
    if raw.labels is not None:
      tags = []
      for i, (row, label) in enumerate(zip(raw.rows, raw.labels)):
        value = json.loads(label)
        # A plain text where a list is expected: whitespace-separated tags.
        value = value.split() if isinstance(value, str) else value
        if not isinstance(value, list) or len(value) != len(words[i]):
          policy.bad(row, errors.LABEL_COUNT, f"{len(words[i])} words but "
                     f"labels {label[:200]}")
          keep[i] = False
        tags.append([label_str(v) for v in value]
                    if isinstance(value, list) else [])
    ids, types, lengths, token_tags = [], [], [], []
    kept = np.flatnonzero(keep)
    for start in range(0, len(kept), _CHUNK):
      rows = kept[start:start + _CHUNK]
      out = tokenizer([words[i] for i in rows], is_split_into_words=True,
                      truncation=True, max_length=max_length,
                      return_attention_mask=False, return_token_type_ids=True)
      for j, i in enumerate(rows):
        ids.append(np.asarray(out["input_ids"][j], np.int32))
        types.append(np.asarray(out["token_type_ids"][j], np.int8))
        lengths.append(len(out["input_ids"][j]))
        if tags is not None:
          token_tags.extend(self._align(out.word_ids(j), tags[i]))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return tokenize.Encoded(
        offsets=offsets,
        tokens={"input_ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
                "token_type_ids": np.concatenate(types) if types else
                np.zeros(0, np.int8)},
        features={},
        labels=np.asarray(token_tags, str) if tags is not None else None,
        rows=np.asarray(raw.rows, np.int32)[keep], where=raw.where,
        unit=raw.unit, skipped=raw.skipped, label_names=raw.label_names)

  def _align(self, word_ids, tags):
    """The raw tag of each sub-token: its word's, or "" (ignored)."""
    out, previous = [], None
    for word in word_ids:
      if word is None or (word == previous and
                          not self.options["label_all_subtokens"]):
        out.append("")
      else:
        out.append(tags[word])
      previous = word
    return out

  def raw_labels(self, enc):
    return enc.labels[enc.labels != ""]

  def finish(self, name, enc, names, training):
    """Tags -> ids (-100 where none); rows with an unknown tag dropped."""
    data = self.config.data
    policy = RowPolicy(data.bad_rows, enc.where, enc.unit)
    lengths = np.diff(enc.offsets)
    if enc.labels is None:
      label_ids = np.full(int(enc.offsets[-1]), IGNORE, np.int32)
      bad = []
    else:
      label_ids, bad = labels_lib.map_token_labels(
          enc.labels, names, policy, np.repeat(enc.rows, lengths))
    keep = ~np.isin(enc.rows, bad)
    offsets, tokens, _, rows, token_keep = select(enc, keep)
    label_ids = label_ids[token_keep]
    split = TokenizedSplit(
        name=name, where=enc.where, offsets=offsets,
        arrays={**tokens, "labels": label_ids},
        fields=text_fields(self.pad_id) + (
            Field("labels", True, np.int32, IGNORE),),
        rows=rows, max_length=data.max_length,
        has_labels=bool((label_ids != IGNORE).any()), label_names=names)
    return split, self.skipped(enc, policy)

  def loss(self, logits, batch):
    """Cross-entropy per labelled token [B, L] (weight 0 elsewhere)."""
    return self.token_cross_entropy(logits, batch, IGNORE)

  def predict(self, logits, batch):
    """A class id per token [B, L]."""
    del batch
    return jnp.argmax(logits, axis=-1)
