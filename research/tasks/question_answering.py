"""Extractive question answering (SQuAD v1.1 / v2.0): the answer is a span.

Sources (`config.data`), all giving checked `research.data.squad`
examples (question, context, gold answers, id):

- the official SQuAD JSON (`data.format="squad"`, or "auto" and a .json
  file in that layout): `squad.SquadFile`; an answer outside its context or
  not at its answer_start is an error naming the file and question id;
- TFDS `squad/v1.1`, `squad/v2.0` and Hugging Face `rajpurkar/squad`,
  `rajpurkar/squad_v2` (`squad.load_squad_tfds` / `load_squad_hf`);
- JSON lines (or other local rows) with `data.text_fields = ("question",
  "context")` and `data.label_field = "answers"` in SQuAD's
  `{"text": [...], "answer_start": [...]}` form; named by file and line.

Features (`squad.build_features`): a context longer than `data.max_length`
becomes several windows overlapping by `doc_stride` tokens (BERT: 384 and
128), the question cut to `max_query_length` tokens; each window keeps each
context token's character span and, for training, the first answer's start
and end token when the window holds all of it, [CLS] otherwise and for
unanswerable questions (`version_2`: SQuAD v2.0; without it an unanswerable
question is an error).

Loss: the mean of the start and end cross-entropies per window, over its
real tokens. Predictions: the start and end logits, turned into answers per
question over all its windows by the `span` evaluator
(`research.metrics.squad_decoding`), scored with the official metrics.

Served (`research.serve`): a question and its context, windowed as in
training, decoded as the `span` evaluator does; the answer's text, character
span and probability (over the n-best list), and for v2.0 the null odds
against the run's `best_null_threshold`.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import optax

from research.configs.plugins import ConfigError
from research.data import squad
from research.data import tokenize
from research.data.splits import Field, TokenizedSplit, text_fields
from research.tasks import common
from research.models import heads
from research.tasks.common import ServeField, ServeFeatures


class Task(common.Task):
  """See the module docstring."""
  HEAD = heads.QuestionAnswering
  EVALUATOR = "span"
  LABEL_JSON = True
  # doc_stride: tokens shared by consecutive windows of a long context (-1:
  # a third of data.max_length, BERT's 128 of 384); max_query_length:
  # question tokens kept (-1: min(64, data.max_length // 2), BERT's 64);
  # version_2: SQuAD v2.0, questions may have no answer.
  CONFIG = {"doc_stride": -1, "max_query_length": -1, "version_2": False}

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields((2,), "a question and a context, e.g. "
                           "('question', 'context')")
    length = config.data.max_length
    if self.options["doc_stride"] == -1:
      self.options["doc_stride"] = length // 3
    if self.options["max_query_length"] == -1:
      self.options["max_query_length"] = min(64, length // 2)
    room = length - self.options["max_query_length"] - 3  # [CLS], 2 x [SEP]
    if not 0 <= self.options["doc_stride"] < room:
      raise ConfigError(
          f"config.task_options.doc_stride={self.options['doc_stride']} must "
          f"be in [0, {room}): data.max_length={length} minus "
          f"max_query_length={self.options['max_query_length']} minus 3 "
          "special tokens is the context each window holds (-1: a third of "
          "data.max_length)")

  def num_outputs(self):
    return 2

  def source(self, kind, **kwargs):
    """The SQuAD readers (official JSON, TFDS, HF), else the generic one."""
    return squad.source(kind, **kwargs) or super().source(kind, **kwargs)

  def cache_key(self):
    return {**super().cache_key(), "version": 2}

  def featurize(self, raw, tokenizer, max_length, policy):
    """Checked examples -> windows, character spans, answer positions."""
    examples, keep = squad.examples_from_rows(raw, policy)
    rows = np.asarray(raw.rows)[keep]
    if not self.options["version_2"]:
      for ex, row in zip(examples, rows):
        if ex.is_impossible:
          policy.bad(row, squad.BAD_QUESTION, f"question {ex.id!r} has no "
                     "answer (SQuAD v2.0): set config.task_options."
                     "version_2=True")
      answerable = np.asarray([not ex.is_impossible for ex in examples], bool)
      rows = rows[answerable]
      examples = [ex for ex, a in zip(examples, answerable) if a]
    f = squad.build_features(
        tokenizer, examples, max_length=max_length,
        doc_stride=self.options["doc_stride"],
        max_query_length=self.options["max_query_length"])
    labeled = raw.labels is not None
    return tokenize.Encoded(
        offsets=f.offsets,
        tokens={"input_ids": f.input_ids, "token_type_ids": f.token_type_ids,
                "offset_start": f.char_spans[:, 0],
                "offset_end": f.char_spans[:, 1]},
        features={"example_index": f.example_index, "cls_index": f.cls_index,
                  "start_positions": f.start_positions,
                  "end_positions": f.end_positions},
        labels=None, rows=rows[f.example_index].astype(np.int32),
        where=raw.where, unit=raw.unit, skipped=raw.skipped, label_names=None,
        examples={
            "id": np.asarray([ex.id for ex in examples], str),
            "context": np.asarray([ex.context for ex in examples], str),
            # Each question's gold answer texts ([] = no answer), as JSON.
            "answers": np.asarray([json.dumps(list(ex.answers))
                                   for ex in examples] if labeled else [],
                                  str),
            "row": rows.astype(np.int32)})

  def label_names(self, declared, train, evals):
    del declared, train, evals
    return ()

  def finish(self, name, enc, names, training):
    del names, training
    fields = text_fields(self.pad_id) + (
        Field("offset_start", True, np.int32, -1),
        Field("offset_end", True, np.int32, -1),
        Field("example_index", False, np.int32, -1),
        Field("cls_index", False, np.int32, 0),
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

  def label_fields(self):
    return (Field("start_positions", False, np.int32, 0),
            Field("end_positions", False, np.int32, 0))

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
            "cls_index": batch["cls_index"],
            "offset_start": batch["offset_start"],
            "offset_end": batch["offset_end"]}

  def distributions(self, outputs, batch):
    """The start and end distributions over each feature's positions [B, L]."""
    return [(self._masked(x, batch), batch["weights"]) for x in outputs]

  # --- Serving -------------------------------------------------------------------

  def serve_setup(self, summary):
    """v2.0: "no answer" above the run's best null threshold (summary.json)."""
    super().serve_setup(summary)
    self._null_threshold = float(next(
        (v for k, v in summary.items() if k.endswith("best_null_threshold")),
        0.0))

  def serve_fields(self):
    return {"question": ServeField(str, "The question."),
            "context": ServeField(str, "The passage that holds the answer.")}

  def serve_features(self, items, max_length):
    """Windows over each context (`squad.build_features`, as in training)."""
    examples = [squad.SquadExample(id=str(i), title="", context=item["context"],
                                   question=item["question"])
                for i, item in enumerate(items)]
    o = self.options
    f = squad.build_features(self.tokenizer, examples, max_length=max_length,
                             doc_stride=o["doc_stride"],
                             max_query_length=o["max_query_length"])
    question_tokens = self.tokenizer(
        [ex.question.lstrip() for ex in examples], add_special_tokens=False,
        return_attention_mask=False)["input_ids"]
    out = [ServeFeatures([], len(q) > o["max_query_length"],
                         {"context": ex.context})
           for ex, q in zip(examples, question_tokens)]
    for w, example in enumerate(f.example_index):
      part = slice(f.offsets[w], f.offsets[w + 1])
      out[example].rows.append({
          "input_ids": f.input_ids[part].tolist(),
          "token_type_ids": f.token_type_ids[part].tolist(),
          "char_spans": f.char_spans[part], "is_context": f.is_context[part],
          "cls_index": int(f.cls_index[w])})
    return out

  def serve_result(self, outputs, features, label_names):
    """{"answer", "start", "end", "score"}; v2.0 also "null_odds" (the
    answer is "" and start/end None above the run's threshold)."""
    del label_names
    from research.metrics import squad_decoding  # pylint: disable=import-outside-toplevel
    from research.evaluators import span  # pylint: disable=import-outside-toplevel
    rows = features.rows
    width = max(len(r["input_ids"]) for r in rows)
    logits = np.zeros((2, len(rows), width))
    spans = np.full((len(rows), width, 2), -1, np.int64)
    context = np.zeros((len(rows), width), bool)
    for i, (row, (start, end)) in enumerate(zip(rows, outputs)):
      n = len(row["input_ids"])
      logits[:, i, :n] = start[:n], end[:n]
      spans[i, :n], context[i, :n] = row["char_spans"], row["is_context"]
    version_2 = self.options["version_2"]
    threshold = getattr(self, "_null_threshold", 0.0)
    decoded = squad_decoding.decode(
        logits[0], logits[1], spans, context, np.zeros(len(rows), np.int64),
        [features.state["context"]], ["q"],
        cls_index=np.asarray([r["cls_index"] for r in rows]),
        n_best=span.Evaluator.CONFIG["n_best"],
        max_answer_length=span.Evaluator.CONFIG["max_answer_length"],
        version_2=version_2, null_threshold=threshold)
    best = (decoded.nbest.get("q") or [None])[0]
    out = {"answer": "", "start": None, "end": None, "score": 0.0}
    if best is not None and decoded.predictions.get("q", "") != "":
      out = {"answer": best.text, "start": best.start_char,
             "end": best.end_char, "score": best.probability}
    if version_2:
      out["null_odds"] = float(decoded.null_odds.get("q", np.inf))
    return out
