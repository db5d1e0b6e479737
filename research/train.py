"""Fine-tunes a BERT-family encoder from an experiment config.

    python -m research.train --config experiments/quickstart.py --workdir /tmp/qs
    python -m research.train --config experiments/quickstart.py \
        --config.optimizer.learning_rate=3e-5 --workdir /tmp/qs2

A `--workdir` that holds checkpoints of an earlier run resumes it exactly
(parameters, optimiser state, step, data position; dropout keys are a function
of the seed and the step). `train_and_evaluate(config, workdir)` is the whole
run and what tests call; `run(config, workdir)` adds the command line's exit
statuses (0, 2 with a one-line message, 143 when preempted). README's
"Failure behaviour" lists what stops a run, what is skipped and how to resume.

`build(config, workdir)` makes the run's pieces (`Run`: data, model split
into trainable and frozen parts, optimiser, update step, evaluators) from the
plug-ins the config names: the task (`research/tasks/`), the methods
(`research/methods/`), the evaluators (`research/evaluators/`) and the
sampler (`research/data/samplers/`). `research.bench` builds its runs through
it too. The file reads top to bottom as the run does: config and plug-ins,
data, model and optimiser, the steps, checkpoint restore, the loop.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from research import data, evaluators, methods as methods_lib, parallelism
from research import tasks
from research.configs import ConfigError, validate
from research.data import augment
from research.models import hf
from research.training import adversarial
from research.training import host_memory
from research.training import xla_flags
from research.training import optimizers
from research.training import partition
from research.training.checkpointing import Checkpointer, CheckpointError, abstract_like
from research.training.steps import make_eval_step, make_train_step, precompile, value_and_grad
from research.training.tracker import create_tracker

log = logging.getLogger("research.train")

# Exit status after saving on preemption (SIGTERM), so schedulers restart us.
PREEMPTED_EXIT_CODE = 143


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite losses in a row)."""


class Preempted(Exception):
  """Raised after the preemption checkpoint is written."""


def _check_data_files(config) -> None:
  """Fails now, naming the field, if a configured data file does not exist.

  The data pipeline would say so too, but only after the tokenizer loaded;
  this way a typo in a path costs no time.
  """
  if config.data.source not in ("local", "hf"):
    return
  files = [("train_file", config.data.train_file)] if config.data.train_file else []
  files += [("eval_file", path)
            for path in data.parse_eval_files(config.data.eval_file).values()]
  for field, path in files:
    if not os.path.isfile(path):
      value = config.data[field]
      raise ConfigError(f"config.data.{field}={value!r}: no such file" +
                        (f" {path!r}" if path != value else ""))


# Automatic buckets per platform (config.data.num_buckets <= 0): each is a
# compilation, 20-40 s for bert-base on an H200 against ~10 s on this CPU,
# where padding is what costs (BENCHMARKS.md).
AUTO_NUM_BUCKETS = {"cpu": 8}
ACCELERATOR_NUM_BUCKETS = 2


def num_buckets(config, mesh) -> int:
  """`config.data.num_buckets`, or the platform's default when <= 0."""
  if config.data.num_buckets > 0:
    return config.data.num_buckets
  platform = mesh.devices.flat[0].platform
  return AUTO_NUM_BUCKETS.get(platform, ACCELERATOR_NUM_BUCKETS)


def precompile_evaluators(evaluators_, params, frozen) -> threading.Thread:
  """Compiles every evaluator's eval step in a background thread.

  Started before step 1, so the first evaluation finds its programs
  compiled instead of stalling the run by their compile (on an H200 the
  eval of 872 sentences took 9.3 s with its compile, the Trainer's 2.0 s).
  The thread sees abstract values only (the training step donates the
  buffers); XLA compiles outside the GIL, beside the training steps.
  """
  abstract = lambda tree: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x, tree)
  params, frozen = abstract(params), abstract(frozen)

  def compile_all():
    try:
      for evaluator in evaluators_.values():
        evaluator.precompile(params, frozen)
    except Exception as e:  # pylint: disable=broad-except
      # The evaluation compiles on first use instead; nothing is lost.
      log.warning("compiling the evaluation ahead failed (%s: %s); it will "
                  "compile at the first evaluation", type(e).__name__, e)

  thread = threading.Thread(target=compile_all, name="eval-precompile",
                            daemon=True)
  thread.start()
  return thread


def make_batchers(config, train_split, eval_splits, mesh, methods=(),
                  split_at=None):
  """The training loader and one eval loader per split, checked against the mesh.

  The training loader yields micro-batches (`batch_size / grad_accum_steps`
  examples, in the order of `config.data.sampler`); eval loaders reuse its
  buckets, so evaluation adds no shapes. With packing
  (`data.examples_per_row` > 1) the training buckets are row lengths, and
  evaluation (never packed) chooses its own from its lengths.

  The methods may replace the sampler (DP-SGD: Poisson sampling). With
  `split_at` (`epoch -> training split`, `config.augment` made anew each
  epoch) the training loader is a `data.EpochBatcher` whose epoch 0 is
  `train_split`.

  Returns:
    (train Batcher, {split name: eval Batcher}).

  Raises:
    parallelism.ParallelismError: a batch size the data axes do not divide.
  """
  accum = config.optimizer.grad_accum_steps
  per_row = config.data.examples_per_row
  hosts = dict(process_index=jax.process_index(),
               process_count=jax.process_count())
  what = ("config.batch_size / grad_accum_steps" if accum > 1
          else "config.batch_size")
  if per_row > 1:
    what = f"({what}) / config.data.examples_per_row (packed rows)"
  parallelism.check_batch_size(config.batch_size // accum // per_row, mesh,
                               what)
  parallelism.check_batch_size(config.eval_batch_size, mesh,
                               "config.eval_batch_size")
  sampler, sampler_options = methods_lib.sampler(
      methods, config.data.sampler, config.data.sampler_options)
  batcher = (data.Batcher if split_at is None else
             functools.partial(data.EpochBatcher, split_at=split_at))
  train_batches = batcher(
      train_split, config.batch_size // accum, config.data.buckets,
      seed=config.seed, shuffle=True, examples_per_row=per_row,
      sampler=sampler, sampler_options=sampler_options,
      num_buckets=num_buckets(config, mesh), **hosts)
  if train_batches.batch_size != config.batch_size // accum:
    parallelism.check_batch_size(
        train_batches.batch_size, mesh,
        f"the padded batch of sampler {sampler!r} "
        "(config.data.sampler_options.max_batch_size)")
  eval_buckets = () if per_row > 1 else train_batches.buckets
  eval_batches = {
      name: data.Batcher(split, config.eval_batch_size, eval_buckets,
                         shuffle=False, **hosts)
      for name, split in eval_splits.items()}
  return train_batches, eval_batches


@dataclasses.dataclass
class Run:
  """A run's pieces, from `build`; `state` is donated by the first step.

  Attributes:
    config: the validated config.
    workdir: the run directory, or None (benchmarks).
    task: the `research.tasks` task; `methods`: the `research.methods`.
    model_dir: the Hugging Face checkpoint directory.
    label_names: label names in id order (empty for regression).
    skipped: {split: {reason: rows}} dropped under data.bad_rows="skip".
    train_split, eval_splits: the `TokenizedSplit`s (with augmentation made
      every epoch, `train_split` is epoch 0's set).
    mesh: the device mesh; batch_sharding: its batch sharding.
    train_batches, eval_batches: the `Batcher`s.
    total_steps: optimizer updates of the run; steps_per_epoch: per epoch.
    tx, schedule: the optax transformation and learning-rate schedule.
    model_cfg: the encoder's `BertConfig`.
    graphdef: the model's structure.
    state: `{"params": trainable, "opt_state": ...}`, placed and sharded.
    frozen: `(frozen params, other variables)`, placed, never donated.
    state_sharding, frozen_sharding: their shardings.
    train_step: `(state, frozen, batch, micro_step) -> (state, metrics)`.
    eval_step: the evaluators' shared `(params, frozen, batch, index)` step.
    evaluators: {name: Evaluator}, in config order.
  """
  config: ml_collections.ConfigDict
  workdir: str | None
  task: Any
  methods: list
  model_dir: str
  label_names: tuple
  skipped: dict
  train_split: Any
  eval_splits: dict
  mesh: Any
  batch_sharding: Any
  train_batches: Any
  eval_batches: dict
  total_steps: int
  steps_per_epoch: int
  tx: Any
  schedule: Any
  model_cfg: Any
  graphdef: Any
  state: dict
  frozen: tuple
  state_sharding: Any
  frozen_sharding: Any
  train_step: Any
  eval_step: Any
  evaluators: dict

  @property
  def best_metric_key(self) -> str:
    """The metric that selects the best checkpoint (the first evaluator's)."""
    return evaluators.best_metric_key(self.config, list(self.evaluators))


def build(config: ml_collections.ConfigDict, workdir: str | None = None,
          devices=None) -> Run:
  """Validates the config and builds the run's pieces; compiles nothing.

  With a `workdir`, writes config.json and labels.json there (reusing the
  label names of an earlier run) and caches tokenised splits in
  `<workdir>/cache`.

  Raises:
    ConfigError, data.DataError, parallelism.ParallelismError: a config or
      data mistake, before anything is compiled.
  """
  # --- Config and plug-ins -------------------------------------------------------
  validate(config)  # also the task's, methods', evaluators', sampler's options
  _check_data_files(config)
  methods = methods_lib.load(config)
  is_main = jax.process_index() == 0
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    if is_main:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

  # --- Data -------------------------------------------------------------------
  model_dir = hf.resolve(config.model.name)
  tokenizer = data.load_tokenizer(str(model_dir))
  task = tasks.load(config, tokenizer)
  labels_path = os.path.join(workdir, "labels.json") if workdir else None
  saved_labels = (data.load_label_names(labels_path)
                  if labels_path and os.path.exists(labels_path) else None)
  train_split, eval_splits, label_names, skipped = (
      task.load_data or data.load_splits)(
      config, tokenizer, cache_dir=os.path.join(workdir, "cache")
      if workdir else None, label_names=saved_labels, task=task)
  if train_split is None:
    raise ConfigError("no training split: set config.data.train_file "
                      "(local) or config.data.train_split")
  task.check_labels(label_names)
  # With config.augment.regenerate="epoch": epoch 0's set, and split_at(e).
  train_split, split_at = augment.from_config(
      config, train_split, tokenizer, adversarial.special_ids(tokenizer))
  if labels_path and is_main:
    data.save_label_names(labels_path, label_names)
  for split, counts in skipped.items():
    log.warning("skipped rows in %s (data.bad_rows='skip'): %s", split, counts)

  mesh = parallelism.make_mesh(config.parallelism, devices)
  accum = config.optimizer.grad_accum_steps
  if task.make_batchers:  # a task with its own input (a corpus)
    train_batches, eval_batches = task.make_batchers(
        config, train_split, eval_splits, mesh)
  else:
    train_batches, eval_batches = make_batchers(
        config, train_split, eval_splits, mesh, methods, split_at)
  micro_steps_per_epoch = train_batches.steps_per_epoch  # DataError if < 1
  try:
    total_steps = optimizers.steps_from_config(config, micro_steps_per_epoch)
    # Built before the model loads: a warmup longer than the run fails fast.
    tx = optimizers.build_optimizer(config.optimizer, total_steps)
    schedule = optimizers.learning_rate_schedule(config.optimizer, total_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from e

  # --- Model: trainable and frozen parts, optimiser state -----------------------
  model = task.load_model(model_dir)
  tx = methods_lib.optimizer(methods, tx, total_steps)
  if config.data.max_length > model.cfg.max_position_embeddings - model.cfg.position_offset:
    raise ConfigError(
        f"config.data.max_length={config.data.max_length} exceeds the "
        f"model's {model.cfg.max_position_embeddings} positions")
  graphdef, trainable, frozen, rest = partition.split_model(
      model, methods_lib.trainable(methods))
  state = {"params": trainable, "opt_state": tx.init(trainable)}
  frozen = (frozen, rest)
  # Place every leaf by its logical axis names (replicated for pmap).
  rules, strategy = (config.parallelism.logical_axis_rules,
                     config.parallelism.strategy)
  state_sharding = parallelism.state_shardings(state, mesh, rules, strategy)
  frozen_sharding = parallelism.state_shardings(frozen, mesh, rules, strategy)
  state = jax.device_put(state, state_sharding)
  frozen = jax.device_put(frozen, frozen_sharding)
  log.info("%d training examples, %d steps/epoch, %d steps, %s %s, padding "
           "efficiency %.3f; training %d of %d parameters",
           len(train_split), max(1, micro_steps_per_epoch // accum),
           total_steps, (f"packed {train_batches.examples_per_row} per row, "
                         "row buckets" if train_batches.packed else "buckets"),
           list(train_batches.buckets), train_batches.padding_efficiency(0),
           partition.count(trainable),
           partition.count(trainable) + partition.count(frozen))

  for method in methods:  # e.g. DP-SGD calibrates its noise for the plan
    method.prepare(train_split=train_split, total_steps=total_steps,
                   workdir=workdir)

  # --- Update step and evaluators -------------------------------------------------
  # The task's loss, wrapped by the methods; their gradient function.
  train_step = make_train_step(
      tx, methods_lib.wrap_loss(methods, task.loss_fn(graphdef)),
      grad_fn=methods_lib.grad_fn(methods, value_and_grad),
      transform=task.transform, seed=config.seed, mesh=mesh,
      strategy=strategy, state_sharding=state_sharding,
      frozen_sharding=frozen_sharding)
  eval_steps = {}

  def make_step(logits=False, wrap=None):
    # wrap: `forward -> forward` of an evaluator (an embedding attack).
    if (logits, wrap) not in eval_steps:
      forward = task.eval_forward(graphdef, logits)
      eval_steps[logits, wrap] = make_eval_step(
          wrap(forward) if wrap else forward, seed=config.seed, mesh=mesh,
          params_sharding=state_sharding["params"],
          frozen_sharding=frozen_sharding, transform=task.transform)
    return eval_steps[logits, wrap]

  batch_sharding = parallelism.batch_sharding(mesh)
  return Run(
      config=config, workdir=workdir, task=task, methods=methods,
      model_dir=str(model_dir), label_names=tuple(label_names),
      skipped=skipped, train_split=train_split, eval_splits=eval_splits,
      mesh=mesh, batch_sharding=batch_sharding, train_batches=train_batches,
      eval_batches=eval_batches, total_steps=total_steps,
      steps_per_epoch=max(1, micro_steps_per_epoch // accum), tx=tx,
      schedule=schedule, model_cfg=model.cfg, graphdef=graphdef, state=state,
      frozen=frozen, state_sharding=state_sharding,
      frozen_sharding=frozen_sharding, train_step=train_step,
      eval_step=make_step(False),
      evaluators=evaluators.build(config, task, eval_splits, eval_batches,
                                  make_step, batch_sharding))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training with periodic evaluation; returns the summary.

  Raises:
    ConfigError, data.DataError, parallelism.ParallelismError: a config or
      data mistake, before anything is compiled.
    CheckpointError: a checkpoint could not be saved (e.g. a full disk) or
      restored; earlier checkpoints are intact.
    TrainingError: `config.max_bad_steps` non-finite losses in a row.
    Preempted: SIGTERM arrived; the current step was saved.
  """
  # --- Config, data, model, steps (build) ----------------------------------------
  run = build(config, workdir)
  is_main = jax.process_index() == 0
  accum = config.optimizer.grad_accum_steps
  total_steps, steps_per_epoch = run.total_steps, run.steps_per_epoch
  state, frozen = run.state, run.frozen
  train_step, train_batches = run.train_step, run.train_batches
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else steps_per_epoch)
  checkpoint_every = (config.checkpoint_every_steps
                      if config.checkpoint_every_steps > 0 else eval_every)
  # Rows dropped under data.bad_rows="skip", for the summary: nothing is
  # dropped silently.
  skipped_counts = {
      f"data/skipped/{split}/{reason.replace(' ', '_')}": count
      for split, counts in run.skipped.items()
      for reason, count in counts.items()}

  eval_compiles = []  # the thread compiling the eval steps (config.precompile)

  def evaluate(params) -> dict[str, float]:
    for thread in eval_compiles:
      thread.join()  # the first evaluation waits for its compiles, if still running
    results = {}
    for name, evaluator in run.evaluators.items():
      prefix = evaluators.prefix(name, run.evaluators)
      for metric, value in evaluator.run(params, frozen).items():
        results[prefix + metric] = value
    return results

  # config.eval_metric (of the first evaluator, or the one it names) selects
  # the best checkpoint and drives early stopping.
  best_key = run.best_metric_key
  sign = 1.0 if config.eval_metric_mode == "max" else -1.0

  # --- Checkpoint restore -------------------------------------------------------
  # Only the trainable parameters and their optimiser state are saved: the
  # frozen part comes back from the pre-trained checkpoint (`build`).
  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints,
                              best_metric=best_key,
                              best_mode=config.eval_metric_mode)
  checkpointer.install_sigterm_handler()
  progress = {"best": None, "evals_without_improvement": 0}
  # Training losses since the last log line (their mean is logged).
  window = {"loss": [], "examples": 0, "tokens": 0, "start": time.perf_counter()}
  start_step = 0
  if checkpointer.latest_step() is not None:
    start_step, state, extras = checkpointer.restore(abstract_like(state))
    progress = extras["progress"]
    # A checkpoint between two log lines (preemption) carries the losses of
    # the open window, so the resumed run logs the same mean.
    window["loss"] = [np.float32(x) for x in extras.get("loss_window", [])]
    if extras.get("data_state") is not None:  # a streaming reader's position
      train_batches.restore_state(extras["data_state"])
    log.info("resumed from step %d in %s", start_step, workdir)
  # Always from the restored step (0 without a checkpoint): records that a
  # killed attempt logged after it are dropped, not duplicated.
  tracker = create_tracker(config, workdir, jax.process_index(),
                           resume_step=start_step)
  tracker.log_config(config.to_dict())
  if skipped_counts:
    tracker.summary(skipped_counts)

  def save(step, eval_results=None, force=False):
    extras = {"progress": progress, "step": step,
              "epoch": step // steps_per_epoch,
              "label_names": list(run.label_names),
              "loss_window": [float(x) for x in jax.device_get(window["loss"])]}
    if hasattr(train_batches, "state_at"):  # grain's iterator (a corpus)
      extras["data_state"] = train_batches.state_at(step * accum)
    checkpointer.save(step, state, extras, metrics=eval_results, force=force)

  def check_bad_steps(step, step_metrics):
    """Stops the run after config.max_bad_steps non-finite losses in a row."""
    bad = int(step_metrics["bad_steps"])
    if bad < config.max_bad_steps:
      return
    # The count is per micro-batch, so with accumulation it spans fewer steps.
    since = f"steps {step - bad + 1}-{step}" if accum == 1 else \
        f"the last {bad} micro-batches up to step {step}"
    raise TrainingError(
        f"step {step}: {bad} consecutive non-finite losses ({since}; "
        f"config.max_bad_steps={config.max_bad_steps}). They were skipped, so "
        f"the parameters are from before them; the last checkpoint is step "
        f"{checkpointer.latest_step()}. Check the data of these steps, lower "
        f"config.optimizer.learning_rate or raise config.max_bad_steps.")

  # --- Training loop ------------------------------------------------------------
  limit = methods_lib.step_limit(run.methods)  # e.g. a privacy budget
  if limit is not None and limit[0] < total_steps:
    log.warning("stopping after step %d of %d: %s", limit[0], total_steps,
                limit[1])
    total_steps = limit[0]
  summary = {}
  if start_step >= total_steps:
    log.info("run already finished at step %d", start_step)
  elif config.precompile:
    t0 = time.perf_counter()
    shapes = precompile(train_step, state, frozen, train_batches,
                        run.batch_sharding, start_step * accum,
                        (total_steps - start_step) * accum)
    log.info("compiled the update for the run's %d batch shapes in %.1f s",
             shapes, time.perf_counter() - t0)
    eval_compiles.append(precompile_evaluators(run.evaluators, state["params"],
                                               frozen))
  previous = None  # (step, metrics) of the last step, read one step late (no stall)
  eval_results = None
  bar = _progress_bar(total_steps, start_step, is_main)
  # Micro-batches from the resume point on; the data position is the step.
  batches = parallelism.prefetch(
      train_batches.iterate(start_step * accum, (total_steps - start_step) * accum),
      run.batch_sharding, config.parallelism.prefetch)
  step = start_step
  failed = True
  try:
    for step in range(start_step + 1, total_steps + 1):
      eval_results = None
      for micro in range(accum):
        host_batch, batch = next(batches)
        state, step_metrics = train_step(state, frozen, batch,
                                         (step - 1) * accum + micro)
        # Counted on the host copy: reading device arrays would wait for them.
        window["examples"] += int(host_batch["weights"].sum()) * jax.process_count()
        window["tokens"] += int(host_batch["attention_mask"].sum()) * jax.process_count()
      window["loss"].append(step_metrics["loss"])
      if previous is not None:
        check_bad_steps(*previous)
      previous = (step, step_metrics)
      if step % config.log_every_steps == 0 or step == total_steps:
        elapsed = time.perf_counter() - window["start"]
        train_metrics = {
            "train/loss": float(np.mean(jax.device_get(window["loss"]))),
            "train/learning_rate": float(run.schedule(step - 1)),
            "train/grad_norm": float(step_metrics["grad_norm"]),
            "train/bad_steps_total": int(optimizers.total_bad_steps(state["opt_state"])),
            "train/examples_per_second": window["examples"] / elapsed,
            "train/tokens_per_second": window["tokens"] / elapsed,
            "train/epoch": step / steps_per_epoch,
            # Batch shapes met so far (each traced once; with
            # config.precompile all were compiled before step 1).
            "train/compilations": train_step._cache_size(),  # pylint: disable=protected-access
            **methods_lib.metrics(run.methods, step),
        }
        tracker.log(step, train_metrics)
        bar.set_postfix(loss=f"{train_metrics['train/loss']:.4f}",
                        ex_s=f"{train_metrics['train/examples_per_second']:.1f}")
        window = {"loss": [], "examples": 0, "tokens": 0,
                  "start": time.perf_counter()}
      bar.update(1)

      if run.evaluators and (step % eval_every == 0 or step == total_steps):
        eval_results = evaluate(state["params"])
        tracker.log(step, eval_results)
        log.info("step %d: %s", step, _fmt(eval_results))
        value = eval_results.get(best_key)
        if value is not None and (progress["best"] is None
                                  or sign * value > sign * progress["best"]):
          progress.update(best=value, best_step=step, evals_without_improvement=0)
        else:
          progress["evals_without_improvement"] += 1
      if step % checkpoint_every == 0 or step == total_steps or eval_results:
        save(step, eval_results)
      if checkpointer.reached_preemption(step):
        save(step, force=True)
        checkpointer.wait_until_finished()
        raise Preempted(f"preempted: saved step {step} in {workdir}; rerun "
                        "the same command to resume")
      if (config.early_stopping_patience > 0 and
          progress["evals_without_improvement"] >= config.early_stopping_patience):
        log.info("early stopping at step %d: no improvement of %s in %d evals",
                 step, best_key, config.early_stopping_patience)
        save(step, eval_results)
        break
    if previous is not None:
      check_bad_steps(*previous)  # the last step is not followed by another
    summary = {"final_step": step, "best_step": progress.get("best_step"),
               f"best/{best_key}": progress["best"],
               "train_step_compilations": train_step._cache_size(),  # pylint: disable=protected-access
               "eval_step_compilations": run.eval_step._cache_size(),  # pylint: disable=protected-access
               # What a method trains (checkpoints hold this part only).
               "params/trainable": partition.count(state["params"]),
               "params/total": partition.count(state["params"])
                               + partition.count(frozen[0]),
               **skipped_counts,
               **methods_lib.metrics(run.methods, step, summary=True)}
    if limit is not None and step == limit[0] < run.total_steps:
      summary["stopped"] = limit[1]
    if eval_results is None and run.evaluators:
      eval_results = evaluate(state["params"])
    summary.update(eval_results or {})
    tracker.summary(summary)
    failed = False
  finally:
    # A failed final save surfaces here; after another error it is only
    # logged, so that the first cause is what the user sees.
    _close_all((bar.close, checkpointer.close, tracker.finish),
               raise_errors=not failed)
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items()}, f, indent=2, default=float)
  return summary


# --- Restoring a finished run (export, predict) -----------------------------------


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's config.json as a ConfigDict (FileNotFoundError naming it)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; is {workdir} a "
                            "research.train workdir?")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Restored:
  """A run's model as a checkpoint left it (`restore`).

  Attributes:
    config: the run's config.json.
    task: its task; graphdef, params (trained), frozen: the model's parts.
    step: the checkpoint's step; which: "best" or "latest".
  """
  config: ml_collections.ConfigDict
  task: Any
  graphdef: Any
  params: Any
  frozen: tuple
  step: int
  which: str

  @property
  def model(self):
    """The whole model: trained parameters merged with the frozen ones."""
    return partition.merge(self.graphdef, self.params, self.frozen)


def restore(workdir: str, which: str = "best", tokenizer=None) -> Restored:
  """The trained model of a run: its task's head, split as the run split it.

  The frozen part is the pre-trained checkpoint's (as in `build`), the
  trained part the run's best (by its eval_metric) or latest checkpoint; the
  optimiser state is not read.

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
    ValueError: `which` is not "best" or "latest".
  """
  if which not in ("best", "latest"):
    raise ValueError(f"--which={which!r}; valid: best, latest")
  config = read_config(workdir)
  task = tasks.load(config, tokenizer)
  model = task.load_model(hf.resolve(config.model.name))
  graphdef, params, frozen, rest = partition.split_model(
      model, methods_lib.trainable(methods_lib.load(config)))
  names = list(evaluators.configs(config, task))
  with Checkpointer(workdir, best_metric=evaluators.best_metric_key(
      config, names), best_mode=config.eval_metric_mode) as checkpointer:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint to restore")
    best = which == "best" and checkpointer.best_step() is not None
    step, state, _ = checkpointer.restore(
        {"params": abstract_like(params)}, best=best, partial=True)
  return Restored(config, task, graphdef, state["params"], (frozen, rest),
                  step, "best" if best else "latest")


def _close_all(closers, raise_errors):
  """Calls every closer even if some fail; then raises the first failure."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if not raise_errors:
        log.error("while stopping after an error: %s: %s", type(e).__name__, e)
      first = first or e
  if raise_errors and first is not None:
    raise first


def _fmt(results):
  return ", ".join(f"{k}={v:.4f}" for k, v in results.items())


def _progress_bar(total, initial, enabled):
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled,
                   desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)


# Errors that end a run with a message and exit status 2, no traceback: user
# mistakes (config, data, model name), a full or read-only disk, and stops
# with a reason. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, data.DataError, hf.CheckpointError, CheckpointError,
               parallelism.ParallelismError, TrainingError)
# OSErrors that say the disk, not the code, is at fault.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
               errno.EPERM, errno.EFBIG)


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Trains as the command line does; returns the process exit status.

  Returns:
    0 when the run finished (the eval metrics are printed);
    PREEMPTED_EXIT_CODE (143) after SIGTERM: the current step is saved and
    rerunning the same command resumes from it;
    2 for a config or data mistake, a checkpoint that cannot be written or
    read (full or read-only disk), or too many non-finite losses in a row:
    one line "error: ..." on stderr, no traceback.
  """
  try:
    validate(config)
    # Both before JAX starts its backend (see host_memory).
    host_memory.configure(config.cpu_malloc)
    xla_flags.configure(config.xla_flags)
    if config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir",
                        os.path.expanduser(config.compilation_cache_dir))
    parallelism.initialize_distributed(config.parallelism.distributed)
    summary = train_and_evaluate(config, workdir)
  except Preempted as e:
    print(e, file=sys.stderr)
    return PREEMPTED_EXIT_CODE
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    if e.errno not in DISK_ERRNOS:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(_fmt({k: v for k, v in summary.items()
              if k.startswith("eval") and isinstance(v, float)}))
  return 0


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "wandb"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  sys.exit(run(flags.FLAGS.config, flags.FLAGS.workdir))


def parse_flags(argv):
  """Parses --config/--config.*/--workdir; a bad override is a message."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config: experiments/<name>.py[:arg]",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
  flags.mark_flags_as_required(["config", "workdir"])
  return parse_or_exit(argv)


def parse_or_exit(argv):
  """Parses the defined flags; a bad flag or config override is a message.

  ml_collections raises AttributeError/KeyError/TypeError/ValueError for
  unknown or mistyped fields, with the nearest valid name ("Did you mean
  ..."); a get_config error arrives as a formatted traceback, whose last line
  is the message. Shared by every CLI that takes --config.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [l.strip(" '\"") for l in text.splitlines() if l.strip(" '\"")]
    message = lines[-1] if "Traceback" in text else " ".join(lines)
    if isinstance(e, AttributeError):
      message = f"unknown config field {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)
