"""Training methods: one module per method, applied in `config.methods` order.

`config.methods = ("bitfit",)` is `research/methods/bitfit.py`; a dotted
name is a module path (a method defined in a test or a project folder). A
family's support code sits beside its methods in a subpackage
(`peft/`, `privacy/`, `adversarial/`), which is not a plug-in.

A run builds each method once (`load`), `Method(config, **options)` with
its options from `config.method_options.<name>` (for a dotted name its last
part) checked against `Method.CONFIG`; that one instance serves the whole
run: building the model, the update step, evaluation, export, prediction
and serving. It changes the run through these seams, each optional:

  setup(context)       called once the run is assembled (`Context`: config,
                       tokenizer, task, model config, the loaded model,
                       mesh, data facts, planned steps); returns the
                       method's own state (a teacher's weights, the weights
                       the run started from, a Fisher diagonal) or None.
                       That state travels beside the frozen weights
                       (`frozen.methods[method.name]`): sharded by the mesh,
                       never donated, never checkpointed. Weights a method
                       trains belong to the model (`adapt_model`) and are
                       selected by `trainable()`, so they are checkpointed.
  trainable()          an nnx filter of the weights to train (intersected
                       over methods and with nnx.Param): the rest is frozen,
                       gets no optimiser state and is not checkpointed
                       (`research.training.partition`);
  wrap_loss(loss_fn)   a new loss function with the same contract
                       (`research.training.steps`): an extra term, a
                       perturbation, a teacher's targets;
  grad_fn(grad_fn)     a new gradient function (per-example gradients,
                       clipping and noise for DP-SGD);
  dense_factory(f)     the factory that builds every dense layer of the model
                       (`research.models.bert.make_dense`): LoRA, AdaLoRA,
                       adapters;
  adapt_model(model)   the loaded model, changed (prefix tuning attaches its
                       prefixes); the same for training, export and predict;
  optimizer(tx, total_steps)  the optax transformation, wrapped (AdaLoRA's
                       rank allocation keeps its state in the optimiser's, so
                       it is checkpointed and resumes exactly);
  training_split(split, tokenizer)  the training examples, changed
                       (augmentation): `(split, split_at)`, `split_at(epoch)`
                       making each epoch's set, or None;
  sampler(name, options)  the training order (Poisson sampling);
  step_limit()         `(steps, reason)`: the run stops after `steps`
                       (a privacy budget), or None;
  metrics(step)        scalars logged with the training metrics (epsilon
                       spent); summary(step): what summary.json gets;
  export_model(model)  the merged model made ready for a Hugging Face
                       directory (LoRA folds its updates in), or a
                       ValueError when the format cannot hold it (adapters);
  export_adapters(model, out_dir, context)  a method that can write its
                       trained part alone (LoRA: a PEFT adapter directory).

`LAST = True` marks a method that must come last (DP-SGD computes
per-example gradients of the loss every other method made).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from research.configs import plugins
from research.configs.plugins import ConfigError
from research.training import partition

PACKAGE = "research.methods"


@dataclasses.dataclass
class Context:
  """The run as its methods see it, built once (`research.train.build`, or
  `research.restore` for export, prediction and serving). Nothing in it is
  read from disk again.

  Attributes:
    config: the run's config.
    tokenizer: its Hugging Face tokenizer.
    task: its task (`research.tasks`).
    model_dir: the pre-trained checkpoint directory.
    model_cfg: the encoder's `BertConfig`.
    graphdef, params, frozen: the loaded model split as the run trains it
      (the trainable part, then a `partition.Frozen` without method state).
    mesh: the device mesh.
    training: False when a finished run is restored (a method then loads
      nothing that only training needs, e.g. a teacher).
    workdir: the run directory, or None.
    train_split: the training `TokenizedSplit` (training only).
    train_batches: its loader (`data.Batcher`; its `sampler` plans the
      epochs), training only.
    label_names: label names in id order.
    total_steps, steps_per_epoch: the planned updates (training only).
    epoch_splits: the training set is made anew each epoch (a method's
      `training_split` returned `split_at`): per-example facts computed
      once from `train_split` hold for epoch 0 only.
  """
  config: Any
  tokenizer: Any
  task: Any
  model_dir: str
  model_cfg: Any
  graphdef: Any
  params: Any
  frozen: Any
  mesh: Any
  training: bool = True
  workdir: str | None = None
  train_split: Any = None
  train_batches: Any = None
  label_names: tuple = ()
  total_steps: int = 0
  steps_per_epoch: int = 0
  epoch_splits: bool = False

  @property
  def num_train_examples(self) -> int:
    return 0 if self.train_split is None else len(self.train_split)

  @property
  def model(self):
    """The loaded model (trainable and frozen parts merged)."""
    return partition.merge(self.graphdef, self.params, self.frozen)


class Method:
  """Base of the methods: changes nothing. Subclasses override a seam."""
  CONFIG = {}
  LAST = False

  def __init__(self, config, **options):
    self.config = config
    self.options = options
    self.name = type(self).__module__.rsplit(".", 1)[-1]

  def setup(self, context: Context):
    """The method's own state (a pytree of arrays), or None."""
    del context

  def trainable(self):
    """An nnx filter of the weights to train."""
    return nnx.Param

  def wrap_loss(self, loss_fn):
    return loss_fn

  def grad_fn(self, grad_fn):
    return grad_fn

  def training_split(self, split, tokenizer):
    del tokenizer
    return split, None

  def sampler(self, name, options):
    return name, options

  def step_limit(self):
    return None

  def metrics(self, step):
    del step
    return {}

  def summary(self, step):
    return self.metrics(step)

  def dense_factory(self, factory):
    return factory

  def adapt_model(self, model):
    return model

  def optimizer(self, tx, total_steps):
    del total_steps
    return tx

  def export_model(self, model):
    return model

  export_adapters = None  # (model, out_dir, context) -> description


def with_defaults(name, **given) -> dict:
  """Every option of method `name` at its default, updated by `given`.

  An experiment sets `config.method_options.<name>` to this, so that each
  option exists in the config and can be overridden on the command line
  (`--config.method_options.dp_sgd.chunk_size=32`; a field the config does
  not hold cannot be).

  Raises:
    ConfigError: an unknown method or option.
  """
  mod = plugins.module(PACKAGE, name, "config.methods", "Method")
  return plugins.options(given, mod.Method.CONFIG,
                         f"config.method_options.{option_key(name)}",
                         f"method {name!r}")


def init_seed(config) -> int:
  """The seed of weights a run initialises (the head, a method's layers):
  `config.model.init_seed`, or `config.seed` when it is -1 (or absent: a
  run saved before the field existed)."""
  seed = int(config.model.get("init_seed", -1))
  return int(config.seed) if seed < 0 else seed


def option_key(name):
  """A method's key in config.method_options: its name, or a path's last part."""
  return name.rsplit(".", 1)[-1]


def load(config, task=None):
  """The run's methods, in config order, each built once.

  Args:
    config: the run config.
    task: the run's task, when known: each method may refuse it
      (`Method.check_task`, a ConfigError naming both).

  Raises:
    ConfigError: a bad name or option, a method that must come last and
      does not, or a task a method cannot work with.
  """
  out = []
  given = config.get("method_options")
  names = tuple(config.get("methods", ()))
  for i, name in enumerate(names):
    mod = plugins.module(PACKAGE, name, f"config.methods[{i}]", "Method")
    key = option_key(name)
    opts = plugins.options(
        given.get(key) if given is not None else None, mod.Method.CONFIG,
        f"config.method_options.{key}", f"method {name!r}")
    method = mod.Method(config, **opts)
    method.name = key
    if method.LAST and i != len(names) - 1:
      raise ConfigError(
          f"config.methods={names!r}: {name!r} must come last (it computes "
          "the gradient of the loss the other methods make)")
    if task is not None and hasattr(method, "check_task"):
      method.check_task(task)
    out.append(method)
  if given is not None:
    unused = sorted(set(given) - {option_key(n) for n in names})
    if unused:
      raise ConfigError(
          f"config.method_options.{unused[0]} is set but config.methods="
          f"{names!r} does not list {unused[0]!r}: its options would be "
          "ignored")
  return out


# Seams that change the training examples or their order: a task with its
# own input (a streamed pre-training corpus) has no split they could change.
DATA_SEAMS = ("training_split", "sampler")


def check_data_seams(methods, task) -> None:
  """ConfigError naming the method and the task when a method changes the
  training data of a task that reads its own (`Task.make_batchers`)."""
  if not task.make_batchers:
    return
  for m in methods:
    used = [s for s in DATA_SEAMS
            if getattr(type(m), s) is not getattr(Method, s)]
    if used:
      raise ConfigError(
          f"config.methods has {m.name!r}, which changes the training data "
          f"({used[0]}), but config.task={task.config.task!r} streams its "
          "own input (a pre-training corpus); use the task's config.data "
          "rows (task_options.corpus='') or leave the method out")


def setup(methods, context: Context) -> dict:
  """Calls each method's `setup` once; {name: state} of those that own state."""
  states = {}
  for m in methods:
    state = m.setup(context)
    if state is not None:
      states[m.name] = state
  return states


def _thread(methods, seam, value, *args):
  """`value` passed through each method's `seam` in config order."""
  for m in methods:
    value = getattr(m, seam)(value, *args)
  return value


def trainable(methods):
  """The filter of the weights to train: nnx.Param and every method's."""
  return nnx.All(nnx.Param, *(m.trainable() for m in methods))


def wrap_loss(methods, loss_fn):
  """`loss_fn` wrapped by each method in order (the last is outermost)."""
  return _thread(methods, "wrap_loss", loss_fn)


def grad_fn(methods, grad_fn):
  """`grad_fn` replaced by each method in order."""
  return _thread(methods, "grad_fn", grad_fn)


def training_split(methods, split, tokenizer):
  """The training split after each method's; `split_at` of the last that
  makes one per epoch (or None)."""
  split_at = None
  for m in methods:
    split, made = m.training_split(split, tokenizer)
    split_at = made or split_at
  return split, split_at


def sampler(methods, name, options):
  """The training sampler and its options after each method's say."""
  for m in methods:
    name, options = m.sampler(name, options)
  return name, options


def step_limit(methods):
  """The smallest `(steps, reason)` of the methods' limits, or None."""
  limits = [lim for m in methods if (lim := m.step_limit()) is not None]
  return min(limits, key=lambda lim: lim[0]) if limits else None


def metrics(methods, step, summary=False):
  """Every method's logged metrics at `step` (its summary's with summary)."""
  out = {}
  for m in methods:
    out.update(m.summary(step) if summary else m.metrics(step))
  return out


def dense_factory(methods, factory):
  """The dense-layer factory after each method's, in order."""
  return _thread(methods, "dense_factory", factory)


def adapt_model(methods, model):
  """The loaded model after each method's `adapt_model`, in order."""
  return _thread(methods, "adapt_model", model)


def optimizer(methods, tx, total_steps):
  """`tx` wrapped by each method in order."""
  return _thread(methods, "optimizer", tx, total_steps)


def export_model(methods, model):
  """The merged model made ready for a Hugging Face directory by each method."""
  return _thread(methods, "export_model", model)
