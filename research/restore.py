"""A finished (or running) run's model, as its checkpoint left it.

    from research import restore
    run = restore.restore_run("/tmp/quickstart")       # best checkpoint
    run.model                                          # the merged nnx model
    evaluator = run.make_evaluator(split, batch_size=64)

What `research.export`, `research.predict` and `research.serve` build on. The
model is assembled exactly as `research.train.build` assembles it
(`train.load_model`: the task's head, the methods' dense layers and
adaptations, the same trainable/frozen split), its methods are built once
and set up with a `methods.Context` whose `training` is False (a method then
loads nothing it only needs to train, such as a teacher), and the trained
part comes from the checkpoint; the optimiser state is not read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from research import data, evaluators, methods as methods_lib, parallelism
from research import tasks, train
from research.configs import validate
from research.evaluators import sequence
from research.models import hf
from research.training import partition, steps
from research.training.checkpointing import Checkpointer, abstract_like

# A directory holding this file is a model version: its config's model.name
# is the complete trained model (an export), so there is no checkpoint.
VERSION_FILE = "version.json"


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's config.json as a ConfigDict (FileNotFoundError naming it)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; is {workdir} a "
                            "research.train workdir?")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def read_summary(workdir: str) -> dict:
  """A run's summary.json ({} before the run finished)."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_version(workdir: str) -> dict | None:
  """A model-registry version's version.json (`research.continual.registry`),
  or None for a training workdir."""
  path = os.path.join(workdir, VERSION_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@dataclasses.dataclass
class Restored:
  """A run's model as a checkpoint left it (`restore_run`).

  Attributes:
    workdir: the run directory.
    config: its config.json.
    context: the `methods.Context` (task, tokenizer, model config, mesh,
      label names; `training` False).
    methods: the run's methods, built once and set up.
    params: the trained part (the checkpoint's); frozen: a
      `partition.Frozen` with the methods' state.
    step: the checkpoint's step; which: "best" or "latest" (a registry
      version: its name).
    make_step: the evaluation-step factory `train.build` gives evaluators.
  """
  workdir: str
  config: ml_collections.ConfigDict
  context: methods_lib.Context
  methods: list
  params: Any
  frozen: partition.Frozen
  step: int
  which: str
  make_step: Any

  task = property(lambda self: self.context.task)
  graphdef = property(lambda self: self.context.graphdef)
  tokenizer = property(lambda self: self.context.tokenizer)
  label_names = property(lambda self: self.context.label_names)

  @property
  def model(self):
    """The whole model: trained parameters merged with the frozen ones."""
    return partition.merge(self.graphdef, self.params, self.frozen)

  def with_model(self, model) -> "Restored":
    """This run with `model` in place of its own: another model of the
    task's head (`research.compress`'s head-pruned or int8 one). All its
    weights count as trained; the methods' state is kept."""
    graphdef, params, frozen, rest = partition.split_model(model)
    frozen = partition.Frozen(frozen, rest, self.frozen.methods)
    context = dataclasses.replace(self.context, graphdef=graphdef,
                                  params=params, frozen=frozen)
    params, frozen, make_step = _placed(context, params, frozen)
    return dataclasses.replace(self, context=context, params=params,
                               frozen=frozen, make_step=make_step)

  def make_evaluator(self, split, batch_size, buckets=(), name=None,
                     cls=sequence.Evaluator, **options):
    """An evaluator of `cls` over `split` with the run's evaluation step."""
    mesh = self.context.mesh
    return cls(name=name or split.name, task=self.task, split=split,
               batcher=data.Batcher(split, batch_size, buckets,
                                    shuffle=False),
               make_step=self.make_step,
               sharding=parallelism.batch_sharding(mesh), config=self.config,
               context=self.context, **options)


def restore_run(workdir: str, which: str = "best", tokenizer=None,
                devices=None) -> Restored:
  """The trained model of a run: its task's head, split as the run split it.

  Args:
    workdir: a `research.train` workdir, or a model-registry version
      (`research.continual.registry`: an export and the config that loads
      it; `which` does not apply).
    which: "best" (by the run's eval_metric) or "latest".
    tokenizer: the run's tokenizer, if already loaded.
    devices: the devices to place the model on (default: the first one).

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
    ValueError: `which` is not "best" or "latest".
  """
  if which not in ("best", "latest"):
    raise ValueError(f"--which={which!r}; valid: best, latest")
  config = read_config(workdir)
  methods = validate(config).methods
  model_dir = hf.resolve(config.model.name)
  tokenizer = tokenizer or data.load_tokenizer(str(model_dir))
  task = tasks.load(config, tokenizer)
  model_cfg, graphdef, params, frozen = train.load_model(config, task, methods,
                                                         model_dir)
  labels_path = os.path.join(workdir, "labels.json")
  label_names = (data.load_label_names(labels_path)
                 if os.path.exists(labels_path) else ())
  parallel = config.parallelism
  mesh = parallelism.make_mesh(
      ml_collections.ConfigDict({**parallel.to_dict(),
                                 "mesh_shape": (1, 1, 1)}),
      (devices or jax.devices())[:1])
  context = methods_lib.Context(
      config=config, tokenizer=tokenizer, task=task, model_dir=str(model_dir),
      model_cfg=model_cfg, graphdef=graphdef, params=params, frozen=frozen,
      mesh=mesh, training=False, workdir=workdir,
      label_names=tuple(label_names or ()))
  frozen = frozen._replace(methods=methods_lib.setup(methods, context))
  version = read_version(workdir)
  if version is not None:  # a model-registry version: the model is complete
    params, frozen, make_step = _placed(context, params, frozen)
    return Restored(workdir, config, context, methods, params, frozen,
                    int(version.get("step", 0)), version["version"], make_step)
  names = list(evaluators.configs(config, task))
  with Checkpointer(workdir, best_metric=evaluators.best_metric_key(
      config, names), best_mode=config.eval_metric_mode) as checkpointer:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint to restore")
    best = which == "best" and checkpointer.best_step() is not None
    step, state, _ = checkpointer.restore(
        {"params": abstract_like(params)}, best=best, partial=True)
  params, frozen, make_step = _placed(context, state["params"], frozen)
  return Restored(workdir, config, context, methods, params, frozen, step,
                  "best" if best else "latest", make_step)


def _placed(context, params, frozen):
  """(params, frozen) on the context's mesh, and their evaluation step."""
  rules = context.config.parallelism.logical_axis_rules
  params_sharding, frozen_sharding = (
      parallelism.state_shardings(x, context.mesh, rules)
      for x in (params, frozen))
  params = jax.device_put(params, params_sharding)
  frozen = jax.device_put(frozen, frozen_sharding)
  make_step = train.eval_step_factory(
      context.task, context.graphdef, seed=steps.root_key(context.config),
      mesh=context.mesh, params_sharding=params_sharding,
      frozen_sharding=frozen_sharding)
  return params, frozen, make_step
