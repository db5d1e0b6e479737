"""Prompt-based classification on the masked-LM head (PET, LM-BFF).

Each example is written into a template with a mask slot (`template`,
"<s1> It was [MASK] ."; pairs "<s1> ? [MASK] , <s2>"), and the masked LM's
logits at the mask for each label's words (`verbalizer`,
"negative=terrible,positive=great") are the label logits: cross-entropy over
the labels trains the whole model, as Schick and Schütze (2021, PET) and Gao,
Fisch and Chen (2021, LM-BFF) fine-tune; with no training step the same
logits classify zero-shot. Templates, verbalizers, multi-token words
(`multi_token`: the first piece or the mean of the pieces' logits) and
truncation (never the mask nor the template's words) are
`research.fewshot.templates`.

Only the mask position goes through the head, and only for the label
words' rows of the tied decoder (`MaskedLM.token_logits`): the logits equal
the full head's at those ids (tested) without a [length, vocab] product.

Options:
  demonstrations  "none" | "random" | "similar": LM-BFF's demonstrations,
                  one training example per label after the prompt
                  (`research.fewshot.demonstrations`), from the training
                  split (`config.data`'s); "similar" draws among the
                  `demo_filter_rate` most similar by `demo_encoder`'s
                  mean-pooled embeddings. Training inputs get `demo_copies`
                  features, each with its own draw; evaluation inputs one.
  mlm_loss        PET's auxiliary masked-LM loss: the loss is
                  (1 - a) * cross-entropy + a * the masked-LM loss of a
                  masked copy of the batch (`mlm_probability` of its tokens,
                  BERT's 80/10/10; PET: a = 1e-4 on unlabelled text, here
                  the training inputs). 0: off.

A checkpoint without a trained masked-LM head (the packaged MiniLM) gets a
new one, which predicts nothing useful: restore one first
(`experiments/mlm_head.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.configs.plugins import ConfigError
from research.data import labels as labels_lib
from research.data import masking
from research.data import splits as splits_lib
from research.data.errors import DataError, RowPolicy
from research.data.splits import Field, TokenizedSplit, select
from research.data.tokenize import Encoded
from research.fewshot import demonstrations
from research.fewshot.templates import (PromptEncoder, Template, Verbalizer,
                                        lookup, word_ids)
from research.models import heads
from research.tasks import common
from research.training import partition

# fold_in streams of the loss function's key for PET's masked copy.
MLM_MASK_STREAM, MLM_DROPOUT_STREAM = 7, 8


class Task(common.Task):
  """See the module docstring."""
  HEAD = heads.MaskedLM
  EVALUATOR = "sequence"
  CONFIG = {
      "template": "<s1> It was [MASK] .",
      "verbalizer": "",           # "label=word|word,...", every label
      "multi_token": "first",     # first | mean (a word of several pieces)
      "demonstrations": "none",   # none | random | similar
      "demo_copies": 1,           # features per training input (demos)
      "demo_filter_rate": 0.5,    # similar: draw among this top fraction
      "demo_encoder": "all-minilm-l6-v2",  # similar: the sentence encoder
      "mlm_loss": 0.0,            # PET's auxiliary masked-LM weight
      "mlm_probability": 0.15,
  }

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields()
    o = self.options
    self.template = Template.parse(o["template"],
                                   len(config.data.text_fields))
    if not o["verbalizer"]:
      raise ConfigError("config.task_options.verbalizer is required: the "
                        "words of each label, e.g. "
                        "'negative=terrible,positive=great'")
    self.label_words = Verbalizer.parse_spec(o["verbalizer"])
    if o["demonstrations"] not in demonstrations.MODES:
      raise ConfigError(
          f"config.task_options.demonstrations={o['demonstrations']!r}; "
          f"valid: {', '.join(demonstrations.MODES)}")
    if o["demo_copies"] < 1:
      raise ConfigError(f"config.task_options.demo_copies="
                        f"{o['demo_copies']} must be >= 1")
    if not 0 < o["demo_filter_rate"] <= 1:
      raise ConfigError(f"config.task_options.demo_filter_rate="
                        f"{o['demo_filter_rate']} must be in (0, 1]")
    if not 0 <= o["mlm_loss"] < 1:
      raise ConfigError(f"config.task_options.mlm_loss={o['mlm_loss']} must "
                        "be in [0, 1) (PET: 1e-4)")
    masking.check_rates(o["mlm_probability"])
    self.verbalizer = None  # built with the label names (`finish`)
    self._pool = None
    self._masker = None

  def num_outputs(self):
    return 0  # the head's outputs are the vocabulary

  # --- Data ----------------------------------------------------------------------

  def cache_key(self):
    key = super().cache_key()
    if self.options["demonstrations"] != "none":
      # Evaluation inputs hold training examples: their features change
      # with the training split and the seed of the draws.
      key.update(pool=self._train_source().identity(), seed=self.config.seed)
    return key

  def _train_source(self):
    # The training split's source, as data.load_splits builds it.
    train, _ = splits_lib._sources(self.config.data, self.source)  # pylint: disable=protected-access
    if train is None:
      raise ConfigError("config.task_options.demonstrations draws from the "
                        "training split; the config has none")
    return train

  def _demo_pool(self, tokenizer, max_length):
    """(RawSplit, per-column token ids) of the training split, read once."""
    if self._pool is None:
      raw = self._train_source().read(
          bad_rows=self.config.data.bad_rows, require_labels=True,
          **self.columns())
      ids = [tokenizer(list(col), add_special_tokens=False,
                       truncation=True, max_length=max_length)["input_ids"]
             for col in raw.texts]
      self._pool = (raw, ids)
    return self._pool

  def _word_ids(self, tokenizer, raw_label, source_names=None):
    """The first label word's ids of a raw label of the training split."""
    names = tuple(self.config.data.label_names) or tuple(source_names or ())
    words = lookup(self.label_words, raw_label, names)
    if words is None:
      raise ConfigError(f"config.task_options.verbalizer: no words for the "
                        f"label {raw_label!r} of the training split")
    return word_ids(tokenizer, words[0])

  def featurize(self, raw, tokenizer, max_length, policy):
    """One prompt per row (and demonstration draw); `mask_position` each."""
    del policy
    encoder = PromptEncoder(tokenizer, self.template, max_length)
    texts = [tokenizer(list(col), add_special_tokens=False, truncation=True,
                       max_length=max_length)["input_ids"]
             for col in raw.texts]
    n = len(raw.rows)
    mode = self.options["demonstrations"]
    draws = [None]
    if mode != "none":
      pool, pool_ids = self._demo_pool(tokenizer, max_length)
      training = pool.where == raw.where and pool.rows == raw.rows
      order = sorted(set(pool.labels))
      label_ids = {l: self._word_ids(tokenizer, l, pool.label_names)
                   for l in order}
      similarity = None
      if mode == "similar":
        enc = self.options["demo_encoder"]
        similarity = (demonstrations.embed(raw.texts, enc, max_length)
                      @ demonstrations.embed(pool.texts, enc, max_length).T)
      copies = self.options["demo_copies"] if training else 1
      draws = [demonstrations.choose(
          pool.labels, order, n, seed=self.config.seed, mode=mode,
          keys=raw.rows, exclude=np.arange(n) if training else None,
          similarity=similarity, filter_rate=self.options["demo_filter_rate"],
          copy=c) for c in range(copies)]
    ids, types, masks, rows = [], [], [], []
    for i in range(n):
      for draw in draws:
        demos = () if draw is None else [
            ([col[j] for col in pool_ids], label_ids[order[k]])
            for k, j in enumerate(draw[i]) if j >= 0]
        a, b, m = encoder.encode([col[i] for col in texts], demos)
        ids.append(a)
        types.append(b)
        masks.append(m)
        rows.append(i)
    rows = np.asarray(rows, np.int64)
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    return Encoded(
        offsets=offsets,
        tokens={"input_ids": np.concatenate(ids),
                "token_type_ids": np.concatenate(types)},
        features={"mask_position": np.asarray(masks, np.int32)},
        labels=(np.asarray(raw.labels, str)[rows] if raw.labels is not None
                else None),
        rows=np.asarray(raw.rows, np.int32)[rows], where=raw.where,
        unit=raw.unit, skipped=raw.skipped, label_names=raw.label_names)

  def finish(self, name, enc, names, training):
    """Labels -> ids (bad ones dropped, as sequence classification does)."""
    if self.verbalizer is None:
      self.set_label_names(names)
    policy = RowPolicy(self.config.data.bad_rows, enc.where, enc.unit)
    if enc.labels is None:
      label_ids, keep = np.full(len(enc), -1, np.int32), np.ones(len(enc), bool)
    else:
      label_ids, keep = labels_lib.map_labels(
          enc.labels, names, False, policy, enc.rows, training)
    if not keep.any():
      raise DataError(f"{enc.where}: no usable rows (skipped: "
                      f"{dict(policy.counts)})")
    offsets, tokens, features, rows, _ = select(enc, keep)
    split = TokenizedSplit(
        name=name, where=enc.where, offsets=offsets,
        arrays={**tokens, "labels": label_ids,
                "mask_position": features["mask_position"]},
        fields=splits_lib.text_fields(self.pad_id) + (
            Field("labels", False, np.int32, 0),
            Field("mask_position", False, np.int32, 0)),
        rows=rows, max_length=self.config.data.max_length,
        has_labels=enc.labels is not None and bool((label_ids != -1).any()),
        label_names=names)
    return split, self.skipped(enc, policy)

  def set_label_names(self, names):
    """Builds the verbalizer over the labels in id order."""
    if self.tokenizer is None:
      raise ValueError("task prompt needs the tokenizer (tasks.load(config, "
                       "tokenizer)) for its label words")
    self.verbalizer = Verbalizer.build(self.label_words, tuple(names),
                                       self.tokenizer,
                                       self.options["multi_token"])

  def _label_table(self):
    if self.verbalizer is None:
      names = tuple(self.config.data.label_names)
      if not names:
        raise ValueError("task prompt: the label names are not known yet "
                         "(load the data, or set config.data.label_names)")
      self.set_label_names(names)
    return jnp.asarray(self.verbalizer.ids), jnp.asarray(
        self.verbalizer.weights)

  # --- Model -----------------------------------------------------------------------

  def forward(self, model, batch, rngs=None):
    """Label logits [B, labels] from the masked LM at each mask position."""
    inputs = self.model_inputs(batch)
    if "embeds_delta" in batch:
      embeds = model.bert.embeddings.word_embeddings(inputs.pop("input_ids"))
      inputs.update(input_ids=None, inputs_embeds=embeds + batch[
          "embeds_delta"].astype(embeds.dtype))
    hidden, _ = model.bert(**inputs, rngs=rngs)  # [B, L, hidden]
    at_mask = jnp.take_along_axis(
        hidden, batch["mask_position"][:, None, None], axis=1)[:, 0]
    ids, weights = self._label_table()
    return model.token_logits(at_mask, ids) @ weights.T

  def loss(self, logits, batch):
    """Cross-entropy over the labels; unlabeled examples (-1) weigh 0."""
    labels = batch["labels"]
    weights = batch["weights"] * (labels >= 0)
    return (optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.maximum(labels, 0)), weights)

  def predict(self, logits, batch):
    del batch
    return jnp.argmax(logits, axis=-1)

  def loss_fn(self, graphdef):
    """The cross-entropy; with `mlm_loss` > 0, PET's mixture with the
    masked-LM loss of a masked copy of the batch."""
    alpha = self.options["mlm_loss"]
    if alpha == 0:
      return super().loss_fn(graphdef)
    if self._masker is None:
      self._masker = masking.make_transform(
          self.tokenizer, mask_rate=self.options["mlm_probability"])

    def loss_fn(trainable, frozen, batch, key):
      model = partition.merge(graphdef, trainable, frozen)
      logits = self.forward(model, batch, rngs=nnx.Rngs(dropout=key))
      losses, weights = self.loss(logits, batch)
      total = weights.sum()
      ce = (losses * weights).sum() / jnp.maximum(total, 1.0)
      masked = self._masker(batch, jax.random.fold_in(key, MLM_MASK_STREAM))
      token_logits = model(masked["input_ids"], batch["attention_mask"],
                           batch["token_type_ids"], rngs=nnx.Rngs(
                               dropout=jax.random.fold_in(
                                   key, MLM_DROPOUT_STREAM)))
      mlm, mlm_weights = self.token_cross_entropy(token_logits, masked)
      mlm = (mlm * mlm_weights).sum() / jnp.maximum(mlm_weights.sum(), 1.0)
      return ((1 - alpha) * ce + alpha * mlm,
              {"weight": total, "outputs": logits})

    return loss_fn
