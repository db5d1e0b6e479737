"""Task-specific knowledge distillation from a fine-tuned teacher.

    config.model.name = "/tmp/student_l3"     # research.methods.distillation.student
    config.methods = ("distill",)
    config.method_options.distill = dict(
        teacher="/tmp/distill/mr/teacher",    # a research.train workdir or HF dir
        temperature=2.0, soft=1.0, hard=0.5, hidden=0.0, attention=0.0)

The student (the run's model: typically a smaller encoder written by
`research.methods.distillation.student`, layers taken from the teacher or a
fresh shape) is trained on

    hard x (the task's loss on the labels)
  + soft x T^2 x CE(softmax(teacher / T), student / T)      (Hinton et al. 2015)
  + hidden x mean over mapped layers of MSE(H_s W_h, H_t)     (TinyBERT)
  + attention x mean over `attention_layers` of KL(A_t || A_s)  (MiniLM)

(`research/methods/distillation/losses.py` defines each term and why T^2).
Options:

  teacher           a `research.train` workdir (its `teacher_checkpoint`:
                    best | latest) or a Hugging Face directory or alias with
                    the task's trained head; the same tokenizer, head and
                    labels as the run. Loaded once, in `setup`, for training
                    only: its weights travel in `frozen.methods["distill"]`,
                    never checkpointed, never donated; export and prediction
                    never load it.
  temperature       T of the soft targets.
  soft, hard, hidden, attention   each term's weight (>= 0, one > 0).
  layer_map         "0:0,1:2,2:4,3:6": student layer -> teacher layer (0:
                    the embeddings' output); "" is TinyBERT's uniform map
                    i -> i * L_t / L_s, with 0 -> 0. The hidden term uses
                    every pair; when the widths differ the student's states
                    go through a trained projection (TinyBERT's W_h, and W_e
                    for layer 0), part of the model (`adapt_model`),
                    checkpointed with it and dropped on export.
  attention_layers  the student layers of the attention term: last (MiniLM)
                    | all (TinyBERT) | "1,3". Student and teacher need the
                    same number of heads.
  teacher_logits    fly: the teacher runs in every step (eval mode, on the
                    clean input); cache: once over the training split in
                    `setup`, its output distributions kept per example (or
                    per token) and gathered by the index fields the method
                    adds to the split, the same after any restart. The cache
                    holds outputs only (hidden and attention terms need
                    `fly`), and needs a training set that stays the same
                    (`augment` with regenerate="once", listed before
                    distill; per-epoch copies need `fly`) and a task
                    without a per-step transform (masked-LM masking).
  teacher_batch_size  examples per forward pass of the cache.
  unlabelled_file   more training text without labels, read as
                    config.data's files are (the same columns, label column
                    optional and ignored): it adds to the distillation
                    terms, never to the hard loss.

Augmented transfer data (TinyBERT's) is the `augment` method listed with
this one (`config.methods = ("augment", "distill")`): the teacher labels each
copy. With hidden or attention terms the method runs the student's forward
itself (once, capturing its hidden states and attention through
`nnx.capture`) and computes the task's loss on it; a method listed before it
that changes the loss is then refused.

Tasks: any with `Task.distributions` (sequence classification and
regression, token classification, question answering, masked LM); the cache
needs one fixed-size distribution per example or per token.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from research import methods
from research.configs import plugins
from research.configs.plugins import ConfigError
from research.methods.distillation import losses
from research.methods.distillation import teacher as teacher_lib
from research.models import bert
from research.tasks import common as task_common
from research.training import partition

WHERE = "config.method_options.distill"
MODES = ("fly", "cache")
LABELLED = "distill_labelled"  # per example: 0 on unlabelled_file's rows


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = {"teacher": "", "teacher_checkpoint": "best", "temperature": 1.0,
            "soft": 1.0, "hard": 0.0, "hidden": 0.0, "attention": 0.0,
            "layer_map": "", "attention_layers": "last",
            "teacher_logits": "fly", "teacher_batch_size": 64,
            "unlabelled_file": ""}

  def __init__(self, config, **options):
    super().__init__(config, **options)
    o = self.options
    if not o["teacher"]:
      raise ConfigError(f"{WHERE}.teacher is empty: a research.train workdir "
                        "or a Hugging Face directory of the fine-tuned teacher")
    if o["teacher_checkpoint"] not in ("best", "latest"):
      raise ConfigError(f"{WHERE}.teacher_checkpoint="
                        f"{o['teacher_checkpoint']!r}; valid: best, latest")
    if o["temperature"] <= 0:
      raise ConfigError(f"{WHERE}.temperature={o['temperature']!r} must be > 0")
    terms = ("soft", "hard", "hidden", "attention")
    for name in terms:
      if o[name] < 0:
        raise ConfigError(f"{WHERE}.{name}={o[name]!r} must be >= 0")
    if not any(o[name] > 0 for name in terms):
      raise ConfigError(f"{WHERE}: every term's weight is 0; set soft, hard, "
                        "hidden or attention > 0")
    if o["teacher_logits"] not in MODES:
      raise ConfigError(f"{WHERE}.teacher_logits={o['teacher_logits']!r}; "
                        f"valid: {', '.join(MODES)}")
    if o["teacher_logits"] == "cache" and (o["hidden"] or o["attention"]):
      raise ConfigError(
          f"{WHERE}.teacher_logits='cache' keeps the teacher's outputs only; "
          "the hidden and attention terms need its forward pass in every "
          "step: use teacher_logits='fly'")
    if o["teacher_batch_size"] < 1:
      raise ConfigError(f"{WHERE}.teacher_batch_size must be >= 1")
    losses.parse_layer_map(o["layer_map"], 10 ** 6, 10 ** 6,
                           f"{WHERE}.layer_map")  # the syntax, early
    self.cache = o["teacher_logits"] == "cache"
    # The student's own forward, capturing its intermediates.
    self.intermediates = bool(o["hidden"] or o["attention"])

  def check_task(self, task):
    if type(task).distributions is task_common.Task.distributions:
      raise ConfigError(
          f"config.methods has 'distill', which compares the student's and "
          f"the teacher's output distributions; config.task="
          f"{self.config.task!r} defines no Task.distributions "
          "(research/tasks/common.py)")

  # --- The model: the trained projection ---------------------------------------

  def _layer_map(self, student_cfg, teacher_cfg):
    return losses.parse_layer_map(
        self.options["layer_map"], student_cfg.num_hidden_layers,
        teacher_cfg.num_hidden_layers, f"{WHERE}.layer_map")

  def adapt_model(self, model):
    """Attaches the hidden term's projection when the widths differ."""
    if not self.options["hidden"]:
      return model
    teacher_cfg = teacher_lib.model_config(self.options["teacher"])
    if teacher_cfg.hidden_size != model.cfg.hidden_size:
      layer_map = self._layer_map(model.cfg, teacher_cfg)
      model.distill_projection = losses.Projection(
          model.cfg.hidden_size, teacher_cfg.hidden_size,
          embeddings=0 in layer_map,
          param_dtype=jnp.dtype(self.config.model.param_dtype),
          rngs=nnx.Rngs(params=methods.init_seed(self.config) + 2))
    return model

  def export_model(self, model):
    """The student alone: the projection only served the hidden term."""
    if getattr(model, "distill_projection", None) is not None:
      del model.distill_projection
    return model

  # --- The training examples: cache indices, unlabelled text --------------------

  def training_split(self, split, tokenizer):
    if self.options["unlabelled_file"]:
      from research.methods.distillation import unlabelled  # pylint: disable=import-outside-toplevel
      split = unlabelled.append(self.config, tokenizer, split,
                                self.options["unlabelled_file"], LABELLED,
                                f"{WHERE}.unlabelled_file")
    if self.cache:
      split = _with_index_fields(split)
    return split, None

  # --- Setup: the teacher, once ---------------------------------------------------

  def setup(self, context):
    self.task = context.task
    if not context.training:
      return None  # export, prediction and serving never need the teacher
    o = self.options
    teacher = teacher_lib.load(o["teacher"], context, o["teacher_checkpoint"],
                               f"{WHERE}.teacher")
    self.graphdef = context.graphdef
    self.layer_map = self._layer_map(context.model_cfg, teacher.cfg)
    self.attention_layers = (losses.parse_layers(
        o["attention_layers"], self.layer_map, f"{WHERE}.attention_layers")
                             if o["attention"] else ())
    if o["attention"] and (teacher.cfg.num_attention_heads
                           != context.model_cfg.num_attention_heads):
      raise ConfigError(
          f"{WHERE}.attention={o['attention']}: the teacher has "
          f"{teacher.cfg.num_attention_heads} heads, the student "
          f"{context.model_cfg.num_attention_heads}; the attention term "
          "compares head by head (set attention=0)")
    if o["hidden"] and teacher.cfg.hidden_size != context.model_cfg.hidden_size:
      trained = [p for p, _ in nnx.to_flat_state(context.params)
                 if "distill_projection" in p]
      if not trained:
        raise ConfigError(
            f"{WHERE}.hidden={o['hidden']}: the projection from the "
            f"student's width {context.model_cfg.hidden_size} to the "
            f"teacher's {teacher.cfg.hidden_size} would not train: a method "
            "in config.methods restricts the trained weights (trainable()) "
            "and leaves it out")
    if self.intermediates:
      _check_no_inner_loss(context.config, self.name)
    if self.cache:
      if context.epoch_splits:
        raise ConfigError(
            f"{WHERE}.teacher_logits='cache' needs the same training set "
            "every epoch, but a method in config.methods makes it anew each "
            "epoch (augment with regenerate='epoch'): use "
            "teacher_logits='fly', or regenerate='once'")
      if self.task.transform is not None:
        raise ConfigError(
            f"{WHERE}.teacher_logits='cache': task {self.task.name!r} "
            "changes each batch in the step (its transform), so the "
            "teacher's outputs differ per step: use teacher_logits='fly'")
      if teacher_lib.EXAMPLE not in context.train_split.arrays:
        raise ConfigError(
            f"{WHERE}.teacher_logits='cache': the training split lost the "
            "method's index fields: list 'distill' after the methods that "
            "change the training examples in config.methods")
      arrays, self.kinds = teacher_lib.cache_outputs(
          teacher.model, self.task, context.train_split,
          o["teacher_batch_size"], tuple(context.config.data.buckets),
          f"{WHERE}.teacher_logits")
      return {"outputs": arrays}
    self.teacher_graphdef, state = nnx.split(teacher.model)
    return {"teacher": state}

  # --- The loss ------------------------------------------------------------------

  def _forward(self, model, batch, rngs):
    """(outputs, captured intermediates) of `model` on `batch`."""
    o = self.options
    kw = {"sow_attention": True} if o["attention"] else {}
    fn = lambda m: self.task.forward(m, batch, rngs=rngs, **kw)  # pylint: disable=unnecessary-lambda-assignment
    if o["hidden"]:
      return nnx.capture(fn, nnx.Intermediate,
                         method_outputs=nnx.Intermediate)(model)
    return nnx.capture(fn, nnx.Intermediate)(model)

  def _teacher(self, state, batch):
    """The teacher's distributions on `batch` and its intermediates."""
    if self.cache:
      outputs = []
      for kind, array in zip(self.kinds, state["outputs"]):
        index = batch[teacher_lib.EXAMPLE if kind == "per_example"
                      else teacher_lib.TOKEN]
        outputs.append(array[jnp.maximum(index, 0)])
      return outputs, None
    teacher = nnx.merge(self.teacher_graphdef, state["teacher"])
    # The teacher reads the clean input: an adversarial method's embedding
    # perturbation lives in the student's embedding space.
    clean = {k: v for k, v in batch.items() if k != "embeds_delta"}
    if self.intermediates:
      outputs, sown = self._forward(teacher, clean, None)
    else:
      outputs, sown = self.task.forward(teacher, clean), None
    outputs, sown = jax.lax.stop_gradient((outputs, sown))
    return [d for d, _ in self.task.distributions(outputs, batch)], sown

  def wrap_loss(self, loss_fn):
    o = self.options
    name, task, t = self.name, self.task, o["temperature"]

    def distilled(trainable, frozen, batch, key):
      hard_batch = batch if LABELLED not in batch else {
          **batch, "weights": batch["weights"] * batch[LABELLED]}
      if self.intermediates:
        model = partition.merge(self.graphdef, trainable, frozen)
        outputs, sown = self._forward(model, batch, nnx.Rngs(dropout=key))
        per, w = task.loss(outputs, hard_batch)
        hard = (per * w).sum() / jnp.maximum(w.sum(), 1.0)
        aux = {"weight": w.sum(), "outputs": outputs}
      else:
        hard, aux = loss_fn(trainable, frozen, hard_batch, key)
        outputs = aux["outputs"]
      targets, teacher_sown = self._teacher(frozen.methods[name], batch)
      loss = o["hard"] * hard
      if o["soft"]:
        for (logits, w), target in zip(task.distributions(outputs, batch),
                                       targets):
          if target.shape != logits.shape:
            raise ValueError(f"{WHERE}: the teacher's outputs {target.shape} "
                             f"do not match the student's {logits.shape}")
          loss += o["soft"] * losses.soft_cross_entropy(logits, target, w, t)
      if o["hidden"] or o["attention"]:
        tokens = losses.token_weights(batch)
      if o["hidden"]:
        mine = losses.hidden_states(sown)
        theirs = losses.hidden_states(teacher_sown)
        project = getattr(model, "distill_projection", None)
        terms = [losses.hidden_mse(
            project(mine[s], s) if project is not None else mine[s],
            theirs[g], tokens) for s, g in self.layer_map.items()]
        loss += o["hidden"] * sum(terms) / len(terms)
      if o["attention"]:
        mine = bert.stack_attention(sown)
        theirs = bert.stack_attention(teacher_sown)
        terms = [losses.attention_kl(mine[s - 1], theirs[self.layer_map[s] - 1],
                                     tokens) for s in self.attention_layers]
        loss += o["attention"] * sum(terms) / len(terms)
      return loss, aux

    return distilled


def _with_index_fields(split):
  """The split with the cache's per-example and per-token index fields."""
  arrays = {**split.arrays,
            teacher_lib.EXAMPLE: np.arange(len(split), dtype=np.int32),
            teacher_lib.TOKEN: np.arange(len(split.input_ids), dtype=np.int32)}
  return dataclasses.replace(split, arrays=arrays,
                             fields=split.fields + teacher_lib.INDEX_FIELDS)


def _check_no_inner_loss(config, name):
  """ConfigError if a method listed before `name` changes the loss: with
  hidden or attention terms this method computes the task's loss itself."""
  names = tuple(config.methods)
  mine = [i for i, n in enumerate(names) if methods.option_key(n) == name]
  for other in names[:mine[0]] if mine else ():
    cls = plugins.module(methods.PACKAGE, other, "config.methods",
                         "Method").Method
    if cls.wrap_loss is not methods.Method.wrap_loss:
      raise ConfigError(
          f"config.methods={names!r}: {other!r} changes the loss before "
          f"{name!r}, whose hidden and attention terms run the student's "
          f"forward and the task's loss themselves: list {name!r} before "
          f"{other!r}, or set {WHERE}.hidden and attention to 0")
