"""The task interface, with the defaults of a sequence-level text task.

A task module's `Task(config, tokenizer=None)` answers, for the trainer, the
benchmark, prediction and export alike:

  model     HEAD (a class of `research.models.heads`, snake_case, loaded by
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
            `config.evals` gets.

This base class holds what most tasks share (text columns featurised by
`tokenize.encode_texts`, label names from the data, the loss functions the
steps run); subclasses override what differs. Options: `CONFIG` holds their
defaults, `config.task_options` their values (`self.options`).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from research.configs import plugins
from research.configs.plugins import ConfigError
from research.data import labels as labels_lib
from research.data import tokenize
from research.training import partition


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
  HEAD = "sequence_classification"
  CONFIG = {}             # this task's options and their defaults
  EVALUATOR = "sequence"  # the evaluator type of `default_evals`
  PACKING = False         # trains on packed rows (data.examples_per_row > 1)
  WORDS = False           # text columns hold pre-split words
  LABEL_JSON = False      # labels are structured (lists, dicts) JSON text
  # `(batch, key) -> batch` run in the step before the loss, or None.
  transform = None
  # A task with its own input (masked_lm's pre-training corpus): a function
  # like `data.load_splits` and one like `train.make_batchers` for the
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

  def load_model(self, model_dir):
    """The head's model with the checkpoint's weights, as config.model says.

    The dtypes, attention implementation, remat and dropout rates
    (`dropout_overrides`) of `config.model`; `config.seed` initialises what
    the checkpoint lacks (the head). The methods of `config.methods` may
    change the dense layers (`Method.dense_factory`: LoRA, adapters) and the
    loaded model (`Method.adapt_model`: prefixes).
    """
    from research import methods as methods_lib  # pylint: disable=import-outside-toplevel
    from research.models import hf, make_dense  # pylint: disable=import-outside-toplevel
    c = self.config
    methods = methods_lib.load(c)
    check_architecture(c.model, hf.read_config(hf.resolve(str(model_dir))),
                       str(model_dir))
    model, _ = hf.load_pretrained(
        str(model_dir), self.HEAD, self.num_outputs(), dtype=c.model.dtype,
        param_dtype=c.model.param_dtype,
        attention_impl=c.model.attention_impl, remat=c.model.remat,
        dense_factory=methods_lib.dense_factory(methods, make_dense),
        config_overrides=dropout_overrides(c.model), seed=c.seed)
    return methods_lib.adapt_model(methods, model)

  def model_inputs(self, batch) -> dict:
    """The model's keyword arguments from a batch (packed rows included)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask",
                                    "token_type_ids")}
    inputs.update({k: batch[k] for k in ("segment_ids", "example_starts")
                   if k in batch})
    return inputs

  def forward(self, model, batch, rngs=None):
    """The model's outputs; `rngs=None` is evaluation (no dropout).

    A batch with `embeds_delta` [B, L, hidden] (`research.training.adversarial`)
    runs on the word embeddings plus that perturbation (`inputs_embeds`).
    """
    inputs = self.model_inputs(batch)
    if "embeds_delta" in batch:
      embeds = model.bert.embeddings.word_embeddings(inputs.pop("input_ids"))
      inputs.update(input_ids=None, inputs_embeds=embeds + batch[
          "embeds_delta"].astype(embeds.dtype))
    return model(**inputs, rngs=rngs)

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

  # --- Evaluation ------------------------------------------------------------------

  def default_evals(self, split_names) -> dict:
    """{evaluator name: its config} when `config.evals` is empty: one
    `EVALUATOR` per evaluation split, named as the split."""
    return {name: {"type": self.EVALUATOR, "split": name}
            for name in split_names}
