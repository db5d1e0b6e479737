"""The task interface, with the defaults of a sequence-level text task.

A task module's `Task(config, tokenizer=None)` answers, for the trainer, the
benchmark, prediction and export alike:

  model     HEAD (a class of `research.models.heads`, loaded by
            `hf.load_pretrained`), `num_outputs()`, `forward(model, batch,
            rngs)`;
  data      `columns()` to read, `featurize(raw, tokenizer, max_length,
            policy)` (rows -> features, cached; one example may make
            several), `label_names(...)`, `finish(...)` (raw labels -> ids,
            the `TokenizedSplit` and its `Field`s);
  training  `loss(outputs, batch) -> (losses, weights)` per example or per
            token, `transform(batch, key)` (optional, run in the jitted step
            with `key = fold_in(fold_in(key(seed), step), ...)`), and
            `predict(outputs, batch)`;
  eval      `default_evals(split_names)`: the evaluators a config without
            `config.evals` gets;
  serving   `serve_fields()` (a request's input fields), `serve_features(
            items, max_length)` (inputs -> model rows, tokenised as in
            training), `serve_result(outputs, features, label_names)` (one
            input's outputs -> its JSON answer) and `EXPLAINABLE`, for
            `research.serve`.

This base class holds what most tasks share (text columns featurised by
`tokenize.encode_texts`, label names from the data, the loss functions the
steps run); subclasses override what differs. Options: `CONFIG` holds their
defaults, `config.task_options` their values (`self.options`).
"""

from __future__ import annotations

import logging

import jax
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research import methods as methods_lib
from research.configs import plugins
from research.configs.plugins import ConfigError
from research.data import labels as labels_lib
from research.models import heads
from research.data import tokenize
from research.training import partition

log = logging.getLogger("research.tasks")


class ServeInputError(ValueError):
  """An input a task cannot answer; `research.serve` returns it as a 422."""


@dataclasses.dataclass(frozen=True)
class ServeField:
  """One input field of a served task (`research.serve` builds its schema).

  Attributes:
    type: str, int or list[str].
    description: shown in the OpenAPI schema.
    required: the request must give it.
    default: its value when not required and absent.
    minimum, maximum: bounds of an int.
    one_of: a name shared by alternative fields: exactly one of them must
      be given (token classification's text or words).
    pattern: a regular expression a string must contain a match of (in the
      schema, so clients and fuzzers see it: masked LM's mask token).
  """
  type: Any
  description: str
  required: bool = True
  default: Any = None
  minimum: int | None = None
  maximum: int | None = None
  one_of: str | None = None
  pattern: str | None = None


@dataclasses.dataclass
class ServeFeatures:
  """One served input, tokenised: its model rows and what decoding needs.

  Attributes:
    rows: one dict per model row (a long QA context makes several windows):
      int lists `input_ids` and `token_type_ids`, plus the task's per-row
      data (QA: each token's character span).
    truncated: the input lost text to `data.max_length` (or the server cut
      it).
    state: per-input data for `serve_result` (words, offsets, options).
  """
  rows: list
  truncated: bool = False
  state: dict = dataclasses.field(default_factory=dict)


def softmax(logits, axis=-1) -> np.ndarray:
  """float64 probabilities of numpy logits (host-side decoding)."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=axis, keepdims=True))
  return z / z.sum(axis=axis, keepdims=True)


def truncated_by_tokens(tokenizer, texts, encoded, max_length) -> list:
  """Whether each text (or pair) lost tokens to `max_length`.

  Only an encoding of exactly max_length tokens can have been cut; those
  are tokenised again without truncation to be sure.

  Args:
    tokenizer: the fast tokenizer.
    texts: one list of strings, or two (pairs).
    encoded: the truncated encodings' input_ids.
    max_length: the truncation length.
  """
  out = [len(ids) >= max_length for ids in encoded]
  full = [i for i, cut in enumerate(out) if cut]
  if full:
    again = tokenizer(*[[t[i] for i in full] for t in texts],
                      return_attention_mask=False, verbose=False)["input_ids"]
    for i, ids in zip(full, again):
      out[i] = len(ids) > max_length
  return out


def dropout_overrides(model_config) -> dict:
  """Hugging Face config keys for the dropout rates `config.model` sets.

  A rate < 0 keeps the checkpoint's.
  """
  overrides = {}
  if model_config.hidden_dropout >= 0:
    overrides["hidden_dropout_prob"] = model_config.hidden_dropout
  if model_config.attention_dropout >= 0:
    overrides["attention_probs_dropout_prob"] = model_config.attention_dropout
  return overrides


def scan_layers(mode) -> bool:
  """`config.model.layers` as `BertModel`'s flag: auto scans on GPUs and
  TPUs (compile time), not on CPUs (measured: no faster to compile)."""
  if mode == "auto":
    return jax.default_backend() != "cpu"
  return mode == "scan"


def architecture_overrides(model_config) -> dict:
  """`BertConfig` fields that `config.model.layer_norm` and `.bias` set
  ("checkpoint": none)."""
  overrides = {}
  if model_config.get("layer_norm", "checkpoint") != "checkpoint":
    overrides["pre_layer_norm"] = model_config.layer_norm == "pre"
  if model_config.get("bias", "checkpoint") != "checkpoint":
    overrides["use_bias"] = model_config.bias == "on"
  return overrides


def check_architecture(model_config, checkpoint_cfg, where) -> None:
  """Raises ConfigError when config.model asks a checkpoint for a layer
  norm position or biases its weights were not trained with."""
  names = {"pre_layer_norm": ("layer_norm", {True: "pre", False: "post"}),
           "use_bias": ("bias", {True: "on", False: "off"})}
  for key, value in architecture_overrides(model_config).items():
    field, spell = names[key]
    if getattr(checkpoint_cfg, key) != value:
      raise ConfigError(
          f"config.model.{field}={spell[value]!r}, but the checkpoint {where} "
          f"is {spell[getattr(checkpoint_cfg, key)]!r}: its weights were "
          f"trained that way. Keep {field}='checkpoint', or set it for a "
          "model from scratch (config.task_options.architecture of task "
          "masked_lm)")


class Task:
  """Base of the tasks; see the module docstring."""
  HEAD = heads.SequenceClassification  # the model class (research/models/heads.py)
  CONFIG = {}             # this task's options and their defaults
  EVALUATOR = "sequence"  # the evaluator type of `default_evals`
  PACKING = False         # trains on packed rows (data.examples_per_row > 1)
  WORDS = False           # text columns hold pre-split words
  LABEL_JSON = False      # labels are structured (lists, dicts) JSON text
  # `(batch, key) -> batch` run in the step before the loss, or None.
  transform = None
  # A task with its own input (masked_lm's pre-training corpus): a function
  # like `data.load_splits` and one like `data.loaders.make_batchers` for the
  # splits it returns. None: config.data's rows and `data.Batcher`.
  load_data = None
  make_batchers = None

  def __init__(self, config, tokenizer=None):
    self.config = config
    self.name = config.task
    self.tokenizer = tokenizer
    self.options = plugins.options(
        config.get("task_options"), self.CONFIG, "config.task_options",
        f"task {config.task!r}")
    per_row = config.data.examples_per_row
    if per_row > 1 and not self.PACKING:
      raise ConfigError(
          f"config.data.examples_per_row={per_row}: task {config.task!r} "
          "does not train on packed rows (packing is for task "
          "sequence_classification); set it to 1")

  @property
  def pad_id(self) -> int:
    pad = getattr(self.tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)

  # --- Model ---------------------------------------------------------------------

  def num_outputs(self) -> int:
    """The head's output size (`hf.load_pretrained`'s num_labels)."""
    return self.config.num_labels

  def load_model(self, model_dir, methods=()):
    """The head's model with the checkpoint's weights, as config.model says.

    The dtypes, attention implementation, remat and dropout rates
    (`dropout_overrides`) of `config.model`; `config.model.init_seed`
    (-1: `config.seed`) initialises what the checkpoint lacks (the head).
    The run's `methods` may change the dense layers (`Method.dense_factory`:
    LoRA, adapters) and the loaded model (`Method.adapt_model`: prefixes); a
    task that builds its model another way (`masked_lm` from scratch)
    applies both too.
    """
    from research.models import hf  # pylint: disable=import-outside-toplevel
    from research.models.pooling import PoolingError  # pylint: disable=import-outside-toplevel
    c = self.config
    check_architecture(c.model, hf.read_config(hf.resolve(str(model_dir))),
                       str(model_dir))
    try:
      model, _ = hf.load_pretrained(
          str(model_dir), self.HEAD, self.num_outputs(),
          config_overrides=dropout_overrides(c.model),
          **self.model_options(methods))
    except PoolingError as e:
      raise ConfigError(str(e)) from None
    if model.bert.pooling is not None:
      log.info("sentence pooling: %s (config.model.pooling=%r)",
               model.bert.pooling, c.model.get("pooling", "pooler"))
    return methods_lib.adapt_model(methods, model)

  def model_options(self, methods=()) -> dict:
    """`create_model` / `hf.load_pretrained` keywords from `config.model`,
    with the methods' dense-layer factory.

    A config without `model.pooling` (a run saved before the field
    existed) restores with the pooler it trained with.
    """
    from research.models import make_dense  # pylint: disable=import-outside-toplevel
    c = self.config
    pooling = c.model.get("pooling", "pooler") if self.HEAD.uses_pooler \
        else "auto"
    return dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                attention_impl=c.model.attention_impl, remat=c.model.remat,
                scan_layers=scan_layers(c.model.layers),
                dense_factory=methods_lib.dense_factory(methods, make_dense),
                pooling=pooling, seed=methods_lib.init_seed(c))

  def model_inputs(self, batch) -> dict:
    """The model's keyword arguments from a batch (packed rows included)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask",
                                    "token_type_ids")}
    inputs.update({k: batch[k] for k in ("segment_ids", "example_starts")
                   if k in batch})
    return inputs

  def forward(self, model, batch, rngs=None, **model_kw):
    """The model's outputs; `rngs=None` is evaluation (no dropout).

    A batch with `embeds_delta` [B, L, hidden] (`research.methods.adversarial.embeddings`)
    runs on the word embeddings plus that perturbation (`inputs_embeds`).
    `model_kw` go to the model's call (`sow_attention=True`: a distillation
    loss reading the attention probabilities).
    """
    inputs = self.model_inputs(batch)
    if "embeds_delta" in batch:
      embeds = model.bert.embeddings.word_embeddings(inputs.pop("input_ids"))
      inputs.update(input_ids=None, inputs_embeds=embeds + batch[
          "embeds_delta"].astype(embeds.dtype))
    return model(**inputs, rngs=rngs, **model_kw)

  # --- Data ------------------------------------------------------------------------

  def columns(self) -> dict:
    """What `sources.read` reads: text fields, the label field, their kinds."""
    d = self.config.data
    return {"text_fields": tuple(d.text_fields), "label_field": d.label_field,
            "words": self.WORDS, "label_json": self.LABEL_JSON}

  def source(self, kind, **kwargs):
    """The reader of one split: `kind` is config.data.source (local | tfds |
    hf), `kwargs` its arguments (`data.splits.default_source`). Tasks with
    formats of their own (CoNLL files, SQuAD JSON) override it."""
    from research.data import splits  # pylint: disable=import-outside-toplevel
    return splits.default_source(kind, **kwargs)

  def cache_key(self) -> dict:
    """What the features depend on besides the data (the cache key)."""
    return {"featurizer": f"{type(self).__module__}.{type(self).__name__}",
            "options": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in sorted(self.options.items())}}

  def featurize(self, raw, tokenizer, max_length, policy):
    """Rows -> features (`tokenize.Encoded`): here one per row, its texts."""
    del policy
    return tokenize.encode_texts(raw, tokenizer, max_length)

  def label_names(self, declared, train, evals) -> tuple:
    """The label names in id order (`labels.resolve_label_names`).

    Args:
      declared: `data.label_names` or a run's labels.json; may be empty.
      train: the training split's `Encoded`, or None.
      evals: {name: Encoded} of the evaluation splits.
    """
    if not self.columns()["label_field"]:
      return ()
    encs = [e for e in [train, *evals.values()] if e is not None]
    source_names = next((e.label_names for e in encs if e.label_names), None)
    raw = lambda e: None if e is None else self.raw_labels(e)  # pylint: disable=unnecessary-lambda-assignment
    return labels_lib.resolve_label_names(
        declared, source_names, raw(train),
        [raw(e) for e in evals.values() if e.labels is not None],
        self.config.num_labels)

  def raw_labels(self, enc):
    """The raw label strings of an `Encoded` that name classes."""
    return enc.labels

  def check_labels(self, label_names) -> None:
    """Raises ConfigError if the data's labels do not fit config.num_labels."""
    if label_names and len(label_names) != self.config.num_labels:
      raise ConfigError(
          f"config.num_labels={self.config.num_labels} but the data has "
          f"{len(label_names)} labels: {', '.join(map(str, label_names))}")

  def check_text_fields(self, counts=(1, 2), what="one text column or a pair"):
    """Raises ConfigError unless data.text_fields names `counts` columns."""
    fields = tuple(self.config.data.text_fields)
    if len(fields) not in counts:
      raise ConfigError(f"config.data.text_fields={fields!r}: task "
                        f"{self.name!r} reads {what}")

  def finish(self, name, enc, names, training):
    """Raw labels -> ids; returns (TokenizedSplit, {reason: rows skipped})."""
    raise NotImplementedError

  @staticmethod
  def skipped(enc, policy) -> dict:
    """Rows skipped while reading and featurising plus `policy`'s."""
    skipped = dict(enc.skipped)
    for reason, count in policy.counts.items():
      skipped[reason] = skipped.get(reason, 0) + count
    return skipped

  # --- Training --------------------------------------------------------------------

  def loss(self, outputs, batch):
    """(per-example or per-token losses, their weights), the same shape."""
    raise NotImplementedError

  def predict(self, outputs, batch):
    """Predictions (an array or a dict of arrays), as evaluators take them."""
    raise NotImplementedError

  def distributions(self, outputs, batch):
    """The model's output distributions: a list of `(logits, weights)`.

    Each `logits` [..., C] holds one categorical distribution per example
    or token (C = 1: a regression output), `weights` [...] how much each
    counts (0 on padding). Methods that compare outputs (SMART's smoothness)
    use them; a task without them returns None and such methods refuse it.
    """
    del outputs, batch
    return None

  @staticmethod
  def token_cross_entropy(logits, batch, ignore=-100):
    """Cross-entropy per token [B, L]; weight 0 where the label is `ignore`."""
    labels = batch["labels"]
    weights = (labels != ignore) * batch["weights"][:, None]
    return (optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.maximum(labels, 0)), weights)

  def loss_fn(self, graphdef):
    """`(trainable, frozen, batch, key) -> (weighted mean loss, aux)`.

    The loss-function contract of `research.training.steps`: the weighted
    mean over the batch given, `aux["weight"]` its total weight; here also
    `aux["outputs"]`, the model's raw outputs (SMART compares them; unused,
    jit drops them).
    """

    def loss_fn(trainable, frozen, batch, key):
      model = partition.merge(graphdef, trainable, frozen)
      outputs = self.forward(model, batch, rngs=nnx.Rngs(dropout=key))
      losses, weights = self.loss(outputs, batch)
      total = weights.sum()
      return ((losses * weights).sum() / jnp.maximum(total, 1.0),
              {"weight": total, "outputs": outputs})

    return loss_fn

  def eval_forward(self, graphdef, logits=False):
    """`(params, frozen, batch) -> outputs` of the evaluation step.

    Outputs: the weighted loss sum and total weight, `predictions`, the
    `weights` the predictions count with, `batch_weights` (0: a padding
    row), `lengths` (real tokens per row), the batch's `labels` (after the
    transform, which may make them), and with `logits` the model's raw
    outputs. Evaluators need nothing else: every host reads the same
    (replicated) outputs.
    """

    def forward(params, frozen, batch):
      model = partition.merge(graphdef, params, frozen)
      return self.eval_outputs(self.forward(model, batch), batch, logits)

    return forward

  def eval_outputs(self, outputs, batch, logits=False) -> dict:
    """The evaluation step's outputs from the model's (`eval_forward`)."""
    losses, weights = self.loss(outputs, batch)
    out = {"loss": (losses * weights).sum(), "weight": weights.sum(),
           "predictions": self.predict(outputs, batch), "weights": weights,
           "batch_weights": batch["weights"],
           "lengths": batch["attention_mask"].sum(axis=-1)}
    if "labels" in batch:
      out["labels"] = batch["labels"]
    if logits:
      out["logits"] = outputs
    return out

  def label_fields(self) -> tuple:
    """The `Field`s a training batch carries besides the text and weights
    (here one label per example: an id, or a score for regression)."""
    from research.data.splits import Field  # pylint: disable=import-outside-toplevel
    dtype = np.float32 if self.config.num_labels == 1 else np.int32
    return (Field("labels", False, dtype, 0),)

  def abstract_batch(self, batch_size, length) -> dict:
    """One training batch as `jax.ShapeDtypeStruct`s: what an abstract step
    is compiled for (`research.bench --abstract_flops`), with no data."""
    ints = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    out = {"input_ids": ints, "attention_mask": ints, "token_type_ids": ints,
           "weights": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
    for f in self.label_fields():
      shape = (batch_size, length) if f.per_token else (batch_size,)
      out[f.name] = jax.ShapeDtypeStruct(shape, f.dtype)
    return out

  # --- Serving (research.serve) ----------------------------------------------------

  # /explain attributes one output row per input (research.interpret and
  # SHAP / LIME over the text): a head with a logit row per example.
  EXPLAINABLE = False

  def serve_setup(self, summary) -> None:
    """Reads what serving needs from the run's summary.json (a dict)."""
    del summary

  def serve_fields(self) -> dict:
    """{name: ServeField}: one input of a /predict request.

    Here a text, or a text pair for a run that trained on two columns.
    """
    fields = {"text": ServeField(str, "The text to classify.")}
    if len(self.config.data.text_fields) == 2:
      fields["text_pair"] = ServeField(
          str, "The second text of the pair (the run trained on "
          f"{tuple(self.config.data.text_fields)}).")
    return fields

  def feedback_row(self, request: dict, label) -> dict:
    """A training row in config.data's columns from a served request and the
    label its feedback says is right (`research.continual` trains on these).

    Here the request's text (and text pair) and a class label. A task whose
    corrections are structured (tags, spans) says so by raising.

    Raises:
      ValueError: the request lacks a field of `serve_fields`, or no label.
    """
    if type(self).serve_fields is not Task.serve_fields:
      raise ValueError(f"task {self.name!r}: turning its feedback into "
                       "training rows is not defined (Task.feedback_row)")
    names = ("text", "text_pair")[:len(self.config.data.text_fields)]
    missing = [n for n in names if not isinstance(request.get(n), str)]
    if missing or label is None:
      raise ValueError(f"a feedback row needs the request's {list(names)} "
                       f"and a label; missing: {missing or ['label']}")
    row = {field: request[n] for field, n in
           zip(self.config.data.text_fields, names)}
    row[self.config.data.label_field] = str(label)
    return row

  def serve_features(self, items, max_length) -> list:
    """Inputs -> `ServeFeatures`, tokenised as `tokenize.encode` does.

    Args:
      items: dicts of `serve_fields` values.
      max_length: tokens per row, special tokens included.
    """
    names = ("text", "text_pair")[:len(self.config.data.text_fields)]
    texts = [[item[n] for item in items] for n in names]
    enc = self.tokenizer(*texts, truncation=True, max_length=max_length,
                         return_attention_mask=False,
                         return_token_type_ids=True)
    cut = truncated_by_tokens(self.tokenizer, texts, enc["input_ids"],
                              max_length)
    return [ServeFeatures([{"input_ids": ids, "token_type_ids": types}], c)
            for ids, types, c in zip(enc["input_ids"], enc["token_type_ids"],
                                     cut)]

  def serve_result(self, outputs, features, label_names) -> dict:
    """One input's answer from its rows' model outputs.

    Args:
      outputs: per row of `features.rows`, the model's outputs for it (an
        array, or a tuple of arrays, without the batch axis; per-token
        outputs padded past the row's length).
      features: the input's `ServeFeatures`.
      label_names: the run's label names (labels.json), in id order.

    Returns:
      A JSON-serialisable dict.
    """
    raise NotImplementedError(f"task {self.name!r} cannot be served: it "
                              "defines no serve_result")

  # --- Evaluation ------------------------------------------------------------------

  def default_evals(self, split_names) -> dict:
    """{evaluator name: its config} when `config.evals` is empty: one
    `EVALUATOR` per evaluation split, named as the split."""
    return {name: {"type": self.EVALUATOR, "split": name}
            for name in split_names}
