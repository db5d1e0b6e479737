"""Masked language modelling: BERT's pre-training objective on raw text.

Two inputs:
  * a pre-training corpus (`task_options.corpus` = "text" | "jsonl" | "tfds"
    | "hf"): plain-text or JSON-lines files (`train_files`, `eval_files`,
    globs allowed), or a TFDS / Hugging Face dataset (`config.data.name`,
    `hf_config`, `train_split`, `eval_splits`). Tokenised once into rows of
    `config.data.max_length` tokens (128 or 512), documents sharing rows
    (`packing="full"`, RoBERTa's FULL-SENTENCES) or not (`"doc"`), written as
    ArrayRecord shards and read through grain (`research.data.corpus`,
    `research.data.corpus_batching`), streaming, sharded by JAX process, its
    iterator position checkpointed with the model;
  * `corpus=""`: the rows of `config.data` (`text_fields`, no label column),
    as every other task reads them.

Masking is dynamic (RoBERTa's): a `transform` in the jitted step
(`research.data.masking`) picks `mask_probability` of each batch's real,
non-special tokens with the key
`fold_in(fold_in(key(seed), step), steps.TRANSFORM_STREAM)`; of those, 80%
become [MASK], 10% a random token, 10% stay (Devlin et al., 2018). What is
chosen together is `masking`: "token" (each token), "whole_word" (every
sub-token of a word), "span" (SpanBERT's spans of whole words, geometric
lengths with p = `span_p`, at most `span_max` words) or "knowledge" (ERNIE's
entity / phrase masking: the names of `knowledge_file`, one per line, found
on word boundaries, case-insensitively with `knowledge_ignore_case`, are
masked whole; `research.data.knowledge`). The key is a function of the seed
and the step, so a resumed run masks exactly as an uninterrupted one;
evaluation uses fixed keys per batch, the same at every evaluation. Labels
are the original ids at the chosen positions (-100 elsewhere).

Sparse prediction (`sparse_prediction`, on by default; Cramming): the head
decodes only the masked positions (`masked_positions` [B, P], at most
`max_predictions` per row, default 2 x mask_probability x row length), not
all of them: the vocab x hidden decoder is the largest matmul of a small
BERT. A row that draws more than P tokens keeps its first whole units that
fit and leaves the rest unmasked, so the loss equals the dense loss of the
same masked batch; per-token losses and predictions are scattered back to
[B, L] for the evaluators.

Why in the step and not on the host: masking is a few element-wise ops on
[B, L] that cost nothing on an accelerator, while the host's Python batch
pipeline is what keeps up with it; JAX's keys need no generator state to
checkpoint; and the masks do not depend on how the global batch is split
over hosts (`jax_threefry_partitionable`).

`next_sentence=True` adds BERT's next-sentence prediction (head
`pre_training`, `BertForPreTraining`'s `cls.seq_relationship`; pairs from
`corpus_batching.sentence_pairs`: A and B cut at sentence boundaries, B the
sentences that follow or another row's, 1/2 each); the loss is then MLM mean
+ NSP mean, as `BertForPreTraining`'s, and evaluation (the `pre_training`
evaluator) adds `nsp_accuracy` and `nsp_loss` (mean NSP cross-entropy) over
the held-out pairs. `architecture` ("hidden_size=256,num_hidden_layers=4,
...") initialises a model of that shape from scratch, with the tokenizer
(and the rest of config.json) of `config.model.name`. A checkpoint without
an MLM head (the packaged MiniLM) gets a new one, reported in the log.

`sparse_prediction=True` runs the head (transform and tied decoder) only
at the masked positions, as Cramming (Geiping and Goldstein 2023) does:
the [length, vocab] product of the dense head is most of a small model's
step (MiniLM at 128 tokens: the decoder's 96 GFLOP against the encoder's
87 per forward of 32 rows). The positions are gathered into a fixed number
per batch (mean + 8 standard deviations of the masked count, so that a
batch with more is practically never met; a masked token beyond it would
not count), and losses and predictions are scattered back to [B, L], so
the metrics are the dense head's. Not with `next_sentence`.

Loss: cross-entropy per masked token. Evaluated by the `token` evaluator:
masked-token `accuracy` and `perplexity` (exp of the mean masked-token loss)
on each held-out split; with `next_sentence`, by the `pre_training`
evaluator: the same and `nsp_accuracy`, `nsp_loss`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tempfile

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research import parallelism
from research.configs.plugins import ConfigError
from research.data import corpus as corpus_lib
from research.data import corpus_batching, knowledge, masking
from research.data.corpus_batching import CorpusBatcher, CorpusSplit
from research.data.errors import DataError
from research.data.splits import TokenizedSplit, select, text_fields
from research.tasks import common
from research.tasks.common import ServeField, ServeInputError
from research.training import partition
from research.models import heads

IGNORE = masking.IGNORE
CORPORA = ("", "text", "jsonl", "tfds", "hf")
log = logging.getLogger(__name__)


def parse_architecture(text):
  """"hidden_size=256,num_hidden_layers=4" -> {field: int or float}."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"config.task_options.architecture: {item!r} is not "
                        "field=value (e.g. 'hidden_size=256,"
                        "num_hidden_layers=4,num_attention_heads=4,"
                        "intermediate_size=1024')")
    try:
      out[key.strip()] = int(value)
    except ValueError:
      try:
        out[key.strip()] = float(value)
      except ValueError:
        out[key.strip()] = value.strip()
  return out


class Task(common.Task):
  """See the module docstring."""
  HEAD = heads.MaskedLM
  EVALUATOR = "token"
  CONFIG = {
      "mask_probability": 0.15,
      "masking": "token",        # token | whole_word | span | knowledge
      "span_p": masking.SPAN_P,  # span: geometric parameter of span lengths
      "span_max": masking.SPAN_MAX,  # span: the longest span, in words
      "knowledge_file": "",      # knowledge: names, one per line (UTF-8)
      "knowledge_ignore_case": False,  # knowledge: match any letter case
      "sparse_prediction": True,  # decode the masked positions only
      "max_predictions": 0,      # sparse: slots per row (0: 2 x rate x length)
      "corpus": "",              # "" (config.data rows) | text | jsonl | tfds | hf
      "train_files": (),         # text / jsonl: files or globs, read in order
      "eval_files": (),          # held-out files (split "validation")
      "documents": "line",       # text: line | blank_line separates documents
      "packing": "full",         # full (documents share rows) | doc
      "text_field": "text",      # jsonl / tfds / hf: the text column
      "corpus_dir": "",          # built rows ("" = <cache>/corpus)
      "eval_rows": 0,            # > 0: evaluate on the first rows only
      "next_sentence": False,    # BERT's NSP head and sentence pairs
      "architecture": "",        # "field=value,...": a new model, from scratch
  }

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.check_text_fields()
    o = self.options
    if not 0 < o["mask_probability"] < 1:
      raise ConfigError(
          f"config.task_options.mask_probability={o['mask_probability']} "
          "must be in (0, 1) (BERT: 0.15)")
    for field, valid in (("corpus", CORPORA), ("packing", corpus_lib.PACKINGS),
                         ("documents", corpus_lib.DOCUMENT_SPLITS)):
      if o[field] not in valid:
        raise ConfigError(f"config.task_options.{field}={o[field]!r}; valid: "
                          f"{', '.join(map(repr, valid))}")
    if o["masking"] not in masking.MODES:
      raise ConfigError(f"config.task_options.masking={o['masking']!r}; "
                        f"valid: {', '.join(map(repr, masking.MODES))}")
    if (o["masking"] == "knowledge") != bool(o["knowledge_file"]):
      raise ConfigError(
          "config.task_options.knowledge_file is the list of masking="
          "'knowledge' (one name per line), and only its: masking="
          f"{o['masking']!r}, knowledge_file={o['knowledge_file']!r}")
    if o["masking"] == "knowledge" and not os.path.isfile(o["knowledge_file"]):
      raise ConfigError(f"config.task_options.knowledge_file="
                        f"{o['knowledge_file']!r}: no such file")
    if not 0 < o["span_p"] < 1 or o["span_max"] < 1:
      raise ConfigError(
          f"config.task_options.span_p={o['span_p']} must be in (0, 1) and "
          f"span_max={o['span_max']} >= 1 (SpanBERT: 0.2, 10)")
    if o["max_predictions"] < 0:
      raise ConfigError(f"config.task_options.max_predictions="
                        f"{o['max_predictions']} must be >= 0 (0: automatic)")
    if o["corpus"] in ("text", "jsonl") and not o["train_files"]:
      raise ConfigError(f"config.task_options.corpus={o['corpus']!r} needs "
                        "config.task_options.train_files (files or globs)")
    if o["next_sentence"] and o["corpus"] == "":
      raise ConfigError("config.task_options.next_sentence needs a corpus "
                        "(config.task_options.corpus)")
    if o["sparse_prediction"] and o["next_sentence"]:
      raise ConfigError("config.task_options.sparse_prediction works without "
                        "next_sentence only (NSP reads the pooled output)")
    self.architecture = parse_architecture(o["architecture"])
    if o["next_sentence"]:
      self.HEAD = heads.PreTraining  # pylint: disable=invalid-name
    self._transform = None

  # --- Model -------------------------------------------------------------------

  def num_outputs(self):
    return 0  # the head's outputs are the vocabulary

  def load_model(self, model_dir, methods=()):
    """The checkpoint's model (a new MLM head if it has none, reported), or
    with `architecture` a new model of that shape. Either way the methods'
    dense layers and adaptations apply (LoRA on a model from scratch trains
    low-rank updates of its random weights, as asked)."""
    if not self.architecture:
      return super().load_model(model_dir, methods)
    from research import methods as methods_lib  # pylint: disable=import-outside-toplevel
    from research.models import create_model, hf  # pylint: disable=import-outside-toplevel
    c = self.config
    try:
      cfg = hf.read_config(model_dir).replace(**{
          **common.dropout_overrides(c.model),
          **common.architecture_overrides(c.model), **self.architecture})
    except TypeError as e:
      raise ConfigError(f"config.task_options.architecture="
                        f"{self.options['architecture']!r}: {e}") from e
    log.info("initialised from scratch (config.task_options.architecture): "
             "%s", cfg)
    model = create_model(self.HEAD, cfg, 0, **self.model_options(methods))
    return methods_lib.adapt_model(methods, model)

  # --- Data: config.data rows --------------------------------------------------

  def columns(self):
    return {**super().columns(), "label_field": ""}  # texts only

  def finish(self, name, enc, names, training):
    del names, training
    offsets, tokens, _, rows, _ = select(enc, np.ones(len(enc), bool))
    split = TokenizedSplit(
        name=name, where=enc.where, offsets=offsets, arrays=tokens,
        fields=text_fields(self.pad_id), rows=rows,
        max_length=self.config.data.max_length, has_labels=True)
    return split, dict(enc.skipped)

  # --- Data: a pre-training corpus (the trainer's load_data / make_batchers) ---

  @property
  def load_data(self):
    """`data.load_splits`' stand-in for a corpus (None: config.data rows)."""
    return self._load_corpus if self.options["corpus"] else None

  @property
  def make_batchers(self):
    """`data.loaders.make_batchers`' stand-in for a corpus (None: the trainer's)."""
    return self._corpus_batchers if self.options["corpus"] else None

  def _files(self, field):
    paths = []
    for pattern in self.options[field]:
      found = sorted(glob.glob(os.path.expanduser(pattern)))
      if not found:
        raise DataError(f"config.task_options.{field}: no such file "
                        f"{pattern!r}")
      paths += found
    return paths

  def _sources(self):
    """{split name: corpus source(s)} of the training and held-out text."""
    o, d = self.options, self.config.data
    if o["corpus"] == "text":
      make = lambda p: corpus_lib.TextFiles(p, o["documents"])  # pylint: disable=unnecessary-lambda-assignment
    elif o["corpus"] == "jsonl":
      make = lambda p: corpus_lib.JsonLines(p, o["text_field"])  # pylint: disable=unnecessary-lambda-assignment
    if o["corpus"] in ("text", "jsonl"):
      out = {d.train_split: make(self._files("train_files"))}
      if o["eval_files"]:
        out["validation"] = make(self._files("eval_files"))
      return out
    if o["corpus"] == "tfds":
      make = lambda s: corpus_lib.TfdsCorpus(d.name, s, o["text_field"],  # pylint: disable=unnecessary-lambda-assignment
                                             d.data_dir)
    else:
      make = lambda s: corpus_lib.HfCorpus(d.name, d.hf_config, s,  # pylint: disable=unnecessary-lambda-assignment
                                           o["text_field"])
    return {s: make(s) for s in (d.train_split, *d.eval_splits)}

  def _load_corpus(self, config, tokenizer, cache_dir=None, label_names=None,
                   task=None):
    """Builds (or reuses) each split's rows; `data.load_splits`' results."""
    del label_names, task
    root = (self.options["corpus_dir"] or
            os.path.join(config.data.cache_dir or cache_dir or
                         os.path.join(tempfile.gettempdir(), "research_bert"),
                         "corpus"))
    splits = {}
    for name, source in self._sources().items():
      info = corpus_lib.build_corpus(
          source, tokenizer,
          os.path.join(root, f"{name}-{config.data.max_length}-"
                       f"{self.options['packing']}"),
          seq_len=config.data.max_length, packing=self.options["packing"])
      log.info("corpus %s: %d rows of %d tokens, %d documents, %d tokens "
               "(%s)", name, info.num_rows, info.seq_len, info.num_documents,
               info.num_tokens, info.directory)
      corpus = corpus_lib.Corpus(info.directory)
      train = name == config.data.train_split
      splits[name] = CorpusSplit(
          name, corpus, None if train else self.options["eval_rows"])
    train = splits.pop(config.data.train_split)
    return train, splits, (), {}

  def _corpus_batchers(self, config, train_split, eval_splits, mesh):
    """Grain batchers of the corpus splits, checked against the mesh."""
    import jax  # pylint: disable=import-outside-toplevel
    micro = config.batch_size // config.optimizer.grad_accum_steps
    parallelism.check_batch_size(micro, mesh, "config.batch_size" + (
        " / grad_accum_steps" if micro != config.batch_size else ""))
    parallelism.check_batch_size(config.eval_batch_size, mesh,
                                 "config.eval_batch_size")
    nsp = self.options["next_sentence"]
    kw = dict(process_index=jax.process_index(),
              process_count=jax.process_count(), next_sentence=nsp,
              sentence_table=(corpus_batching.sentence_table(self.tokenizer)
                              if nsp else None))
    train = CorpusBatcher(train_split, micro, seed=config.seed, **kw)
    evals = {name: CorpusBatcher(split, config.eval_batch_size,
                                 seed=config.seed, shuffle=False, **kw)
             for name, split in eval_splits.items()}
    return train, evals

  # --- Training ------------------------------------------------------------------

  def transform(self, batch, key):
    """Dynamic masking: new input_ids and labels (see the module docstring)."""
    if self._transform is None:
      if self.tokenizer is None:
        raise ValueError("task masked_lm needs the tokenizer (tasks.load("
                         "config, tokenizer)) for its [MASK] id and vocabulary")
      o = self.options
      table = None
      if o["masking"] == "knowledge":
        table = knowledge.KnowledgeTable.build(
            knowledge.read_names(o["knowledge_file"]), self.tokenizer,
            ignore_case=o["knowledge_ignore_case"])
        log.info("knowledge list %s: %s", o["knowledge_file"], table.stats)
      self._transform = masking.make_transform(
          self.tokenizer, mask_rate=o["mask_probability"], mode=o["masking"],
          knowledge=table, span_p=o["span_p"], span_max=o["span_max"],
          max_predictions=(o["max_predictions"] if o["sparse_prediction"]
                           else None))
    return self._transform(batch, key)

  def label_fields(self):
    """None: the transform masks the batch and makes its labels."""
    return ()

  def head_fraction(self, seq_len):
    """The share of positions the head decodes (`research.bench`'s FLOPs)."""
    o = self.options
    if not o["sparse_prediction"]:
      return 1.0
    return (o["max_predictions"] or masking.default_max_predictions(
        seq_len, o["mask_probability"])) / seq_len

  def model_inputs(self, batch):
    inputs = super().model_inputs(batch)
    if "masked_positions" in batch:  # sparse prediction
      inputs["masked_positions"] = batch["masked_positions"]
    return inputs

  @staticmethod
  def _scatter(values, positions, length):
    """[B, P] values at `positions` -> [B, L] (zeros elsewhere)."""
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], length), values.dtype).at[
        rows, positions].set(values)

  def loss(self, logits, batch):
    """Cross-entropy per masked token [B, L] (weight 0 elsewhere)."""
    if isinstance(logits, tuple):  # (MLM, NSP): the MLM part
      logits = logits[0]
    positions = batch.get("masked_positions")
    if positions is None:
      return self.token_cross_entropy(logits, batch, IGNORE)
    # Sparse: logits [B, P, vocab] at `positions`.
    length = batch["labels"].shape[1]
    losses, weights = self.token_cross_entropy(logits, {
        "labels": jnp.take_along_axis(batch["labels"], positions, axis=1),
        "weights": batch["weights"]}, IGNORE)
    return (self._scatter(losses, positions, length),
            self._scatter(weights.astype(losses.dtype), positions, length))

  def loss_fn(self, graphdef):
    """The MLM loss; with `next_sentence`, plus the mean NSP cross-entropy."""
    if not self.options["next_sentence"]:
      return super().loss_fn(graphdef)

    def loss_fn(trainable, frozen, batch, key):
      model = partition.merge(graphdef, trainable, frozen)
      outputs = self.forward(model, batch, rngs=nnx.Rngs(dropout=key))
      losses, weights = self.loss(outputs, batch)
      total = weights.sum()
      nsp = nsp_sums(outputs[1], batch["next_sentence_label"],
                     batch["weights"])
      return ((losses * weights).sum() / jnp.maximum(total, 1.0)
              + nsp["nsp_loss"] / jnp.maximum(nsp["nsp_count"], 1.0),
              {"weight": total, "outputs": outputs})

    return loss_fn

  def eval_outputs(self, outputs, batch, logits=False):
    """The MLM outputs; with `next_sentence`, plus the batch's `nsp_sums`."""
    out = super().eval_outputs(outputs, batch, logits)
    if self.options["next_sentence"]:
      out.update(nsp_sums(outputs[1], batch["next_sentence_label"],
                          batch["weights"]))
    return out

  def predict(self, logits, batch):
    """The most likely token at every position [B, L] (sparse: at the
    masked positions, 0 elsewhere)."""
    if isinstance(logits, tuple):
      logits = logits[0]
    best = jnp.argmax(logits, axis=-1)
    if "masked_positions" not in batch:
      return best
    return self._scatter(best, batch["masked_positions"],
                         batch["input_ids"].shape[1])

  def distributions(self, logits, batch):
    """The vocabulary distribution at every real token [B, L, V] (with
    next-sentence prediction, also its [B, 2])."""
    tokens = batch["weights"][:, None] * batch["attention_mask"]
    if isinstance(logits, tuple):
      return [(logits[0], tokens), (logits[1], batch["weights"])]
    return [(logits, tokens)]

  def default_evals(self, split_names):
    if self.options["corpus"]:  # the corpus's held-out splits
      split_names = (["validation"] if self.options["eval_files"] else []) \
          if self.options["corpus"] in ("text", "jsonl") else \
          list(self.config.data.eval_splits)
    if self.options["next_sentence"]:
      return {name: {"type": "pre_training", "split": name, "metrics": (
          "accuracy", "perplexity", "nsp_accuracy", "nsp_loss")}
              for name in split_names}
    return {name: {"type": "token", "split": name,
                   "metrics": ("accuracy", "perplexity")}
            for name in split_names}


  # --- Serving -------------------------------------------------------------------

  def serve_fields(self):
    mask = getattr(self.tokenizer, "mask_token", None) or "[MASK]"
    return {**super().serve_fields(),
            "text": ServeField(str, f"A text with one or more {mask} tokens "
                               "to fill.", pattern=re.escape(mask)),
            "top_k": ServeField(int, "Candidates per mask.", required=False,
                                default=5, minimum=1, maximum=50)}

  def serve_features(self, items, max_length):
    """Tokenised texts; each must keep at least one [MASK] token."""
    out = super().serve_features(items, max_length)
    mask_id = self.tokenizer.mask_token_id
    for i, (item, feats) in enumerate(zip(items, out)):
      positions = [p for p, t in enumerate(feats.rows[0]["input_ids"])
                   if t == mask_id]
      if not positions:
        where = (f"after the first {max_length} tokens (data.max_length)"
                 if self.tokenizer.mask_token in item["text"] else "")
        raise ServeInputError(f"inputs[{i}].text has no "
                              f"{self.tokenizer.mask_token} token {where}"
                              .strip())
      feats.state = {"positions": positions, "top_k": item.get("top_k") or 5}
    return out

  def serve_result(self, outputs, features, label_names):
    """{"fills": [{"position", "candidates": [{token, token_id, score}]}]}:
    the top_k tokens (softmax probability) at each mask, in text order."""
    del label_names
    logits = outputs[0]
    logits = logits[0] if isinstance(logits, tuple) else logits  # MLM of (MLM, NSP)
    k = features.state["top_k"]
    fills = []
    for position in features.state["positions"]:
      probabilities = common.softmax(logits[position])
      best = np.argsort(-probabilities, kind="stable")[:k]
      tokens = self.tokenizer.convert_ids_to_tokens(best.tolist())
      fills.append({"position": position, "candidates": [
          {"token": t, "token_id": int(i), "score": float(probabilities[i])}
          for t, i in zip(tokens, best)]})
    return {"fills": fills}


def nsp_sums(logits, labels, weights):
  """Next-sentence prediction sums over a batch's real rows; jittable.

  Args:
    logits: float [B, 2] (`seq_relationship`; class 0: B follows A).
    labels: int [B] `next_sentence_label`.
    weights: float [B], 0 for padding rows.

  Returns:
    {"nsp_loss": the cross-entropy sum, "nsp_correct": rows whose arg-max is
    the label, "nsp_count": real rows}: float32 scalars.
  """
  logits = jnp.asarray(logits, jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {"nsp_loss": (loss * weights).sum(),
          "nsp_correct": (correct * weights).sum(),
          "nsp_count": weights.sum()}
