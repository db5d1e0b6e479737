"""Extractive question answering (SQuAD): the answer is a span of the context.

Rows hold a question, a context and SQuAD's `answers` ({"text": [...],
"answer_start": [character offsets]}, JSON lines or TFDS / Hugging Face
`squad`); `config.data.text_fields = ("question", "context")`,
`config.data.label_field = "answers"`. A context longer than
`data.max_length` becomes several features, windows that overlap by
`doc_stride` tokens (the fast tokenizer's `return_overflowing_tokens`), as
in BERT's SQuAD recipe. Each feature records its example, the character
span of each context token (`offset_mapping`; -1 outside the context) and,
for training, the token positions of the first answer: [CLS] (0) when the
answer is not inside the window.

Loss: the mean of the start and end cross-entropies per feature, over the
real tokens. Predictions: the start and end logits, turned into answer
texts per example by the `span` evaluator (exact match and F1).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import optax

from research.configs.plugins import ConfigError
from research.data import errors
from research.data import tokenize
from research.data.splits import Field, TokenizedSplit, text_fields
from research.tasks import common

_CHUNK = 1024  # examples per tokenizer call


class Task(common.Task):
  """See the module docstring."""
  HEAD = "question_answering"
  EVALUATOR = "span"
  LABEL_JSON = True
  # doc_stride: tokens shared by consecutive windows of a long context;
  # -1: data.max_length // 3 (BERT's 128 of 384).
  CONFIG = {"doc_stride": -1}

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields((2,), "a question and a context, e.g. "
                           "('question', 'context')")
    if self.options["doc_stride"] == -1:
      self.options["doc_stride"] = config.data.max_length // 3
    if not 0 <= self.options["doc_stride"] < config.data.max_length // 2:
      raise ConfigError(
          f"config.task_options.doc_stride={self.options['doc_stride']} must "
          f"be in [0, data.max_length / 2 = {config.data.max_length // 2}) "
          "(-1: a third of data.max_length)")

  def num_outputs(self):
    return 2

  def featurize(self, raw, tokenizer, max_length, policy):
    """Windows over each context; answer positions; token char spans."""
    questions, contexts = raw.texts
    answers = ([json.loads(a) for a in raw.labels]
               if raw.labels is not None else None)
    keep = np.ones(len(questions), bool)
    q_lengths = [len(ids) for ids in tokenizer(
        questions, add_special_tokens=False)["input_ids"]]
    for i, row in enumerate(raw.rows):
      problem = None
      if q_lengths[i] + 4 > max_length - self.options["doc_stride"]:
        problem = (f"the question has {q_lengths[i]} tokens: no room for "
                   f"the context in data.max_length={max_length}")
      elif answers is not None:
        problem = _answer_problem(answers[i], contexts[i])
      if problem:
        policy.bad(row, errors.BAD_ANSWER, problem)
        keep[i] = False
    kept = np.flatnonzero(keep)
    parts = {k: [] for k in ("input_ids", "token_type_ids", "offset_start",
                             "offset_end")}
    features = {k: [] for k in ("example_index", "start_positions",
                                "end_positions")}
    lengths, rows = [], []
    for start in range(0, len(kept), _CHUNK):
      chunk = kept[start:start + _CHUNK]
      out = tokenizer([questions[i].lstrip() for i in chunk],
                      [contexts[i] for i in chunk], truncation="only_second",
                      max_length=max_length, stride=self.options["doc_stride"],
                      return_overflowing_tokens=True,
                      return_offsets_mapping=True, return_token_type_ids=True,
                      return_attention_mask=False)
      for f, j in enumerate(out["overflow_to_sample_mapping"]):
        example = int(start + j)  # index among the kept examples
        in_context = np.asarray([s == 1 for s in out.sequence_ids(f)])
        spans = np.asarray(out["offset_mapping"][f], np.int64).reshape(-1, 2)
        span_start = np.where(in_context, spans[:, 0], -1)
        span_end = np.where(in_context, spans[:, 1], -1)
        parts["input_ids"].append(np.asarray(out["input_ids"][f], np.int32))
        parts["token_type_ids"].append(
            np.asarray(out["token_type_ids"][f], np.int8))
        parts["offset_start"].append(span_start.astype(np.int32))
        parts["offset_end"].append(span_end.astype(np.int32))
        answer = answers[chunk[j]] if answers is not None else None
        first, last = _positions(answer, span_start, span_end)
        features["example_index"].append(example)
        features["start_positions"].append(first)
        features["end_positions"].append(last)
        lengths.append(len(out["input_ids"][f]))
        rows.append(raw.rows[chunk[j]])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty = np.zeros(0, np.int32)
    return tokenize.Encoded(
        offsets=offsets,
        tokens={k: np.concatenate(v) if v else empty for k, v in parts.items()},
        features={k: np.asarray(v, np.int32) for k, v in features.items()},
        labels=None, rows=np.asarray(rows, np.int32), where=raw.where,
        unit=raw.unit, skipped=raw.skipped, label_names=None,
        examples={"context": np.asarray([contexts[i] for i in kept], str),
                  "answers": np.asarray(
                      [raw.labels[i] for i in kept]
                      if raw.labels is not None else [], str),
                  "row": np.asarray(raw.rows, np.int32)[kept]})

  def label_names(self, declared, train, evals):
    del declared, train, evals
    return ()

  def finish(self, name, enc, names, training):
    del names, training
    fields = text_fields(self.pad_id) + (
        Field("offset_start", True, np.int32, -1),
        Field("offset_end", True, np.int32, -1),
        Field("example_index", False, np.int32, -1),
        Field("start_positions", False, np.int32, 0),
        Field("end_positions", False, np.int32, 0))
    split = TokenizedSplit(
        name=name, where=enc.where, offsets=enc.offsets,
        arrays={**enc.tokens, **enc.features}, fields=fields, rows=enc.rows,
        max_length=self.config.data.max_length,
        has_labels=len(enc.examples["answers"]) > 0,
        examples=dict(enc.examples))
    return split, dict(enc.skipped)

  def _masked(self, logits, batch):
    # Padding positions can never be an answer.
    return jnp.where(batch["attention_mask"] > 0, logits,
                     jnp.finfo(jnp.float32).min)

  def loss(self, outputs, batch):
    """(start + end cross-entropy) / 2 per feature [B]."""
    start, end = (self._masked(x, batch) for x in outputs)
    ce = optax.softmax_cross_entropy_with_integer_labels
    losses = (ce(start, batch["start_positions"]) +
              ce(end, batch["end_positions"])) / 2
    return losses, batch["weights"]

  def predict(self, outputs, batch):
    """Start and end logits [B, L] and what post-processing needs."""
    start, end = (self._masked(x, batch) for x in outputs)
    return {"start_logits": start, "end_logits": end,
            "example_index": batch["example_index"],
            "offset_start": batch["offset_start"],
            "offset_end": batch["offset_end"]}


def _answer_problem(answers, context):
  """Why SQuAD-style `answers` do not fit `context`, or None."""
  if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
    return (f"answers {json.dumps(answers)[:200]} is not "
            '{"text": [...], "answer_start": [...]}')
  texts, starts = answers["text"], answers["answer_start"]
  if not isinstance(texts, list) or not isinstance(starts, list) or \
      len(texts) != len(starts):
    return "answers.text and answers.answer_start are not lists of one length"
  for text, start in zip(texts, starts):
    if not isinstance(start, int) or context[start:start + len(text)] != text:
      return (f"the answer {text!r} is not at character {start} of the "
              "context")
  return None


def _positions(answers, span_start, span_end):
  """Token positions of the first answer in a window; (0, 0) if outside."""
  if not answers or not answers["text"]:
    return 0, 0
  first_char = answers["answer_start"][0]
  last_char = first_char + len(answers["text"][0])  # exclusive
  context = np.flatnonzero(span_start >= 0)
  if span_start[context[0]] > first_char or span_end[context[-1]] < last_char:
    return 0, 0
  starts = context[span_start[context] <= first_char]
  ends = context[span_end[context] >= last_char]
  return int(starts[-1]), int(ends[0])
