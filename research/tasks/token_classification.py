"""Token classification: one label per word (NER, POS tagging, chunking).

Sources (`config.data`), all giving one list of words and one tag per word
per sentence:

- CoNLL column files (`data.format="conll"`, or "auto" and a .txt / .conll /
  .iob file): `research.data.conll.ConllFile`; `-DOCSTART-` lines, IOB1 or
  IOB2; a malformed line, or a tag outside `data.label_names` when it is
  set, is an error naming the file and the line.
- JSON lines `{"tokens": ["EU", "rejects", ...], "ner_tags": ["B-ORG", "O",
  ...]}`, TFDS `conll2003` and Hugging Face datasets whose tags are a
  sequence of ClassLabels (`data.text_fields = ("tokens",)`,
  `data.label_field = "ner_tags"` / TFDS's `"ner"`).

With `scheme` "auto" (default) tags must be IOB and IOB1 becomes IOB2 (as
`conll.read_conll` does), "iob2" refuses IOB1, "none" takes tags as they are
(POS tags, chunks). Words are tokenised with the fast tokenizer's word
alignment (`conll.tokenize_words`) and tags put on sub-tokens by
`conll.align_tags`: a word's first sub-token carries its tag, the others and
the special tokens are ignored (-100, weight 0), as in BERT's NER setup;
`label_all_subtokens` gives later sub-tokens the word's tag (B-X -> I-X).
Words past `data.max_length` tokens are truncated away; the evaluator counts
them as predicted "O".

Loss: cross-entropy per labelled token. Predictions: a class per token,
turned into one tag per word (its first sub-token's) by the `tagging`
evaluator, which scores entities as conlleval does and writes CoNLL files.

Served (`research.serve`): a raw text, split into words by the tokenizer's
pre-tokenizer, or pre-split words; the answer gives each word's tag and the
entities (conlleval's chunks) with their character offsets in the text.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from research.configs.plugins import ConfigError
from research.data import conll
from research.data import errors
from research.data import labels as labels_lib
from research.data import tokenize
from research.data.errors import RowPolicy
from research.data.sources import label_str
from research.data.splits import Field, TokenizedSplit, select, text_fields
from research.tasks import common
from research.models import heads
from research.tasks.common import ServeField, ServeFeatures, ServeInputError

IGNORE = -100
SCHEMES = ("auto", "iob2", "none")
# Extensions data.format="auto" reads as CoNLL column files.
CONLL_EXTENSIONS = (".txt", ".conll", ".iob", ".iob2")


class Task(common.Task):
  """See the module docstring."""
  HEAD = heads.TokenClassification
  EVALUATOR = "tagging"
  WORDS = True
  LABEL_JSON = True
  CONFIG = {"label_all_subtokens": False, "scheme": "auto"}

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields((1,), "one column of words, e.g. ('tokens',)")
    if self.options["scheme"] not in SCHEMES:
      raise ConfigError(f"config.task_options.scheme="
                        f"{self.options['scheme']!r}; valid: "
                        f"{', '.join(SCHEMES)}")

  def source(self, kind, **kwargs):
    """CoNLL files for data.format "conll" (or "auto" and a CoNLL name)."""
    if kind == "local":
      fmt, path = kwargs["fmt"], kwargs["path"]
      if fmt == "conll" or (fmt == "auto" and os.path.splitext(
          path)[1].lower() in CONLL_EXTENSIONS):
        scheme = "iob2" if self.options["scheme"] == "iob2" else "auto"
        return conll.ConllFile(path, scheme, self.config.data.label_names)
    return super().source(kind, **kwargs)

  def cache_key(self):
    return {**super().cache_key(), "version": 2}

  def _sentences(self, raw, policy):
    """(keep [n], word tags per row or None): tags checked and in IOB2."""
    keep = np.ones(len(raw.rows), bool)
    if raw.labels is None:
      return keep, None
    scheme = self.options["scheme"]
    tags = []
    for i, (row, label, words) in enumerate(zip(raw.rows, raw.labels,
                                                raw.texts[0])):
      value = json.loads(label)
      # A plain text where a list is expected: whitespace-separated tags.
      value = value.split() if isinstance(value, str) else value
      value = ([label_str(v) for v in value] if isinstance(value, list)
               else None)
      problem = None
      if value is None or len(value) != len(words):
        problem = (errors.LABEL_COUNT,
                   f"{len(words)} words but labels {label[:200]}")
      elif scheme != "none":
        bad = conll.check_tags(value, scheme)
        problem = bad and (conll.BAD_TAG, f"word {bad[0] + 1}: {bad[1]}")
      if problem:
        policy.bad(row, *problem)
        keep[i] = False
        value = []
      elif scheme != "none":
        value = conll.iob1_to_iob2(value)
      tags.append(value)
    return keep, tags

  def featurize(self, raw, tokenizer, max_length, policy):
    """Sub-tokens of each row's words, each sub-token's raw tag and word."""
    keep, tags = self._sentences(raw, policy)
    kept = np.flatnonzero(keep)
    words = [raw.texts[0][i] for i in kept]
    ids, word_ids, token_tags, lengths = [], [], [], []
    pieces = conll.tokenize_words(tokenizer, words, max_length=max_length)
    for j, (input_ids, word_index) in enumerate(pieces):
      ids.extend(input_ids)
      word_ids.extend(word_index)
      lengths.append(len(input_ids))
      if tags is not None:
        token_tags.extend(conll.align_tags(
            word_index, tags[kept[j]],
            label_all_subtokens=self.options["label_all_subtokens"]))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    word_offsets = np.zeros(len(words) + 1, np.int64)
    np.cumsum([len(w) for w in words], out=word_offsets[1:])
    flat = lambda lists: [x for l in lists for x in l]  # pylint: disable=unnecessary-lambda-assignment
    return tokenize.Encoded(
        offsets=offsets,
        tokens={"input_ids": np.asarray(ids, np.int32),
                "token_type_ids": np.zeros(len(ids), np.int8),
                "word_ids": np.asarray(word_ids, np.int32)},
        features={},
        labels=np.asarray(token_tags, str) if tags is not None else None,
        rows=np.asarray(raw.rows, np.int32)[keep], where=raw.where,
        unit=raw.unit, skipped=raw.skipped, label_names=raw.label_names,
        # Per sentence: its words and gold tags, for word-level scores and
        # CoNLL output (`examples` of the split).
        examples={"words": np.asarray(flat(words), str),
                  "word_offsets": word_offsets,
                  "tags": np.asarray(flat(tags[i] for i in kept), str)
                  if tags is not None else np.zeros(0, str)})

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
    examples = dict(enc.examples)
    if examples and not keep.all():
      word_keep = np.repeat(keep, np.diff(examples["word_offsets"]))
      counts = np.diff(examples["word_offsets"])[keep]
      examples["word_offsets"] = np.concatenate([[0], np.cumsum(counts)])
      examples["words"] = examples["words"][word_keep]
      if len(examples["tags"]):
        examples["tags"] = examples["tags"][word_keep]
    split = TokenizedSplit(
        name=name, where=enc.where, offsets=offsets,
        # word_ids: not a Field (never batched); the evaluator maps sub-token
        # predictions back to words with it.
        arrays={**tokens, "labels": label_ids},
        fields=text_fields(self.pad_id) + (
            Field("labels", True, np.int32, IGNORE),),
        rows=rows, max_length=data.max_length,
        has_labels=bool((label_ids != IGNORE).any()), label_names=names,
        examples=examples)
    return split, self.skipped(enc, policy)

  def label_fields(self):
    return (Field("labels", True, np.int32, IGNORE),)

  def loss(self, logits, batch):
    """Cross-entropy per labelled token [B, L] (weight 0 elsewhere)."""
    return self.token_cross_entropy(logits, batch, IGNORE)

  def predict(self, logits, batch):
    """A class id per token [B, L]."""
    del batch
    return jnp.argmax(logits, axis=-1)

  def distributions(self, logits, batch):
    """One distribution per real token [B, L, C]."""
    return [(logits, batch["weights"][:, None] * batch["attention_mask"])]

  # --- Serving -------------------------------------------------------------------

  def serve_fields(self):
    return {
        "text": ServeField(str, "The text to tag, split into words as the "
                           "tokenizer does (whitespace and punctuation); or "
                           "give `words`.", required=False, one_of="input"),
        "words": ServeField(list[str], "Pre-split words, as in the training "
                            "data (instead of `text`).", required=False,
                            one_of="input")}

  def serve_features(self, items, max_length):
    """Words (with character spans) -> sub-tokens and each one's word."""
    sentences, states = [], []
    for i, item in enumerate(items):
      text, given = item.get("text"), item.get("words")
      if (text is None) == (given is None):
        raise ServeInputError(f"inputs[{i}]: give exactly one of text and "
                              "words")
      if given is not None:
        blank = [j for j, w in enumerate(given) if not w.strip()]
        if not given or blank:
          raise ServeInputError(f"inputs[{i}].words: give one or more "
                                "words, none of them empty" + (
                                    f" (words[{blank[0]}] is)" if blank
                                    else ""))
        text = " ".join(given)
        starts = np.cumsum([0] + [len(w) + 1 for w in given[:-1]])
        spans = [(w, int(a), int(a) + len(w)) for w, a in zip(given, starts)]
      else:
        spans = tokenize.words(self.tokenizer, text)
        if not spans:
          raise ServeInputError(f"inputs[{i}].text has no words")
      sentences.append([w for w, _, _ in spans])
      states.append({"text": text, "spans": [(a, b) for _, a, b in spans]})
    out = []
    for (ids, word_ids), words, state in zip(conll.tokenize_words(
        self.tokenizer, sentences, max_length=max_length), sentences, states):
      out.append(ServeFeatures(
          [{"input_ids": ids, "token_type_ids": [0] * len(ids),
            "word_ids": word_ids}],
          truncated=max(word_ids) + 1 < len(words), state=state))
    return out

  def serve_result(self, outputs, features, label_names):
    """{"words": [{word, start, end, tag, score}], "entities": [{type, text,
    start, end, score}]}; a word cut off by max_length is "O" (score 0)."""
    row = features.rows[0]
    probabilities = common.softmax(outputs[0][:len(row["input_ids"])])
    spans, text = features.state["spans"], features.state["text"]
    ids = conll.word_predictions(row["word_ids"],
                                 probabilities.argmax(-1).tolist(), len(spans))
    scores = conll.word_predictions(row["word_ids"],
                                    probabilities.max(-1).tolist(), len(spans),
                                    fill=0.0)
    tags = ["O" if i is None else str(label_names[i]) for i in ids]
    words = [{"word": text[a:b], "start": a, "end": b, "tag": t, "score": p}
             for (a, b), t, p in zip(spans, tags, scores)]
    entities = []
    if self.options["scheme"] != "none":  # IOB tags make chunks
      from research.metrics import ner  # pylint: disable=import-outside-toplevel
      for kind, first, last in ner.entities(tags):
        start, end = spans[first][0], spans[last][1]
        entities.append({"type": kind, "text": text[start:end],
                         "start": start, "end": end,
                         "score": float(np.mean(scores[first:last + 1]))})
    return {"words": words, "entities": entities}
