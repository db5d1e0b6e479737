"""Fine-tunes a BERT-family encoder from an experiment config.

    python -m research.train --config experiments/quickstart.py --workdir /tmp/qs
    python -m research.train --config experiments/quickstart.py \
        --config.optimizer.learning_rate=3e-5 --workdir /tmp/qs2

A `--workdir` that holds checkpoints of an earlier run resumes it exactly
(parameters, optimiser state, step, data position; dropout keys are a function
of the seed and the step). `train_and_evaluate(config, workdir)` is the whole
run and what tests call; the command line (`research.cli`) adds its exit
statuses (0, 2 with a one-line message, 143 when preempted). README's
"Failure behaviour" lists what stops a run, what is skipped and how to resume.

The file reads top to bottom as a run happens: `build` validates the config
once and makes the run's pieces (`Run`) from the plug-ins it names: data
(the task, `research/tasks/`; the sampler, `research/data/samplers/`), the
model and its trainable/frozen split, the methods (`research/methods/`, each
built once and set up with the run's `methods.Context`), the optimiser, the
update step and the evaluators (`research/evaluators/`); then
`train_and_evaluate` restores a checkpoint if there is one and runs the loop
(`train_steps` is the one place an update runs; `research.bench` times the
same generator). Restoring a finished run for export, prediction or serving
is `research.restore`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from research import data, evaluators, methods as methods_lib, parallelism
from research import tasks
from research.configs import ConfigError, validate
from research.data import loaders
from research.models import hf
from research.training import optimizers
from research.training import partition
from research.training.checkpointing import Checkpointer, abstract_like
from research.training.steps import (make_eval_step, make_train_step,
                                     precompile, root_key, value_and_grad)
from research.training.tracker import create_tracker

log = logging.getLogger("research.train")

# Exit status after saving on preemption (SIGTERM), so schedulers restart us.
PREEMPTED_EXIT_CODE = 143
# The update step's own metrics (research/training/steps.py); any other is a
# gradient function's, logged under its name.
STEP_METRICS = ("loss", "grad_norm", "bad_steps")


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite losses in a row)."""


class Preempted(Exception):
  """Raised after the preemption checkpoint is written."""


# --- Model -----------------------------------------------------------------------


def load_model(config, task, methods, model_dir):
  """The task's model with the methods' changes, split as the run trains it.

  Shared by `build` and `research.restore`, so training, export, prediction
  and serving see the same model.

  Returns:
    (model config, graphdef, trainable params, `partition.Frozen` without
    method state).
  """
  model = task.load_model(model_dir, methods)
  if config.data.max_length > (model.cfg.max_position_embeddings
                               - model.cfg.position_offset):
    raise ConfigError(
        f"config.data.max_length={config.data.max_length} exceeds the "
        f"model's {model.cfg.max_position_embeddings} positions")
  graphdef, trainable, frozen, rest = partition.split_model(
      model, methods_lib.trainable(methods))
  return model.cfg, graphdef, trainable, partition.Frozen(frozen, rest)


def eval_step_factory(task, graphdef, *, seed, mesh, params_sharding,
                      frozen_sharding):
  """`make_step(logits=False, wrap=None)`: the evaluators' jitted steps.

  One step per (logits, wrap) pair, shared by every evaluator asking for
  it; `wrap` (`forward -> forward`) is an evaluator's own forward, e.g. an
  embedding attack (`evaluators/robust.py`).
  """
  steps = {}

  def make_step(logits=False, wrap=None):
    if (logits, wrap) not in steps:
      forward = task.eval_forward(graphdef, logits)
      steps[logits, wrap] = make_eval_step(
          wrap(forward) if wrap else forward, seed=seed, mesh=mesh,
          params_sharding=params_sharding, frozen_sharding=frozen_sharding,
          transform=task.transform)
    return steps[logits, wrap]

  return make_step


@dataclasses.dataclass
class Run:
  """A run's pieces, from `build`; `state` is donated by the first step.

  `context` is the `methods.Context` the methods were set up with (task,
  tokenizer, model config, the loaded model, mesh, data facts); `frozen` a
  `partition.Frozen` (frozen weights, other variables, the methods' own
  state), never donated; `train_step(state, frozen, batch, micro_step) ->
  (state, metrics)`; `eval_step` the evaluators' shared step; `skipped`
  {split: {reason: rows}} dropped under data.bad_rows="skip".
  """
  config: ml_collections.ConfigDict
  workdir: str | None
  context: methods_lib.Context
  methods: list
  skipped: dict
  eval_splits: dict
  batch_sharding: Any
  train_batches: Any
  eval_batches: dict
  tx: Any
  schedule: Any
  state: dict
  frozen: partition.Frozen
  state_sharding: Any
  frozen_sharding: Any
  train_step: Any
  eval_step: Any
  evaluators: dict

  # The context's facts, by the names the loop and benchmarks use.
  task = property(lambda self: self.context.task)
  mesh = property(lambda self: self.context.mesh)
  model_cfg = property(lambda self: self.context.model_cfg)
  graphdef = property(lambda self: self.context.graphdef)
  model_dir = property(lambda self: self.context.model_dir)
  label_names = property(lambda self: self.context.label_names)
  train_split = property(lambda self: self.context.train_split)
  total_steps = property(lambda self: self.context.total_steps)
  steps_per_epoch = property(lambda self: self.context.steps_per_epoch)

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
  # --- Config and plug-ins: checked once, the methods built once -----------------
  methods = validate(config).methods
  loaders.check_data_files(config)
  is_main = jax.process_index() == 0
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    if is_main:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

  # --- Data ------------------------------------------------------------------------
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
  # A method may change the training examples (augmentation); with a set
  # made anew each epoch, epoch 0's and split_at(epoch).
  train_split, split_at = methods_lib.training_split(methods, train_split,
                                                     tokenizer)
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
    train_batches, eval_batches = loaders.make_batchers(
        config, train_split, eval_splits, mesh, methods_lib.sampler(
            methods, config.data.sampler, config.data.sampler_options),
        split_at)
  micro_steps_per_epoch = train_batches.steps_per_epoch  # DataError if < 1
  try:
    total_steps = optimizers.steps_from_config(config, micro_steps_per_epoch)
    # Built before the model loads: a warmup longer than the run fails fast.
    tx = optimizers.build_optimizer(config.optimizer, total_steps)
    # Jitted: logging it eagerly dispatched (and compiled) each jnp op.
    schedule = jax.jit(optimizers.learning_rate_schedule(config.optimizer,
                                                         total_steps))
  except ValueError as e:
    raise ConfigError(str(e)) from e

  # --- Model, methods' setup, optimiser state ------------------------------------------
  model_cfg, graphdef, trainable, frozen = load_model(config, task, methods,
                                                      model_dir)
  context = methods_lib.Context(
      config=config, tokenizer=tokenizer, task=task, model_dir=str(model_dir),
      model_cfg=model_cfg, graphdef=graphdef, params=trainable, frozen=frozen,
      mesh=mesh, training=True, workdir=workdir, train_split=train_split,
      train_batches=train_batches,
      label_names=tuple(label_names), total_steps=total_steps,
      steps_per_epoch=max(1, micro_steps_per_epoch // accum),
      epoch_splits=split_at is not None)
  # Once, before the step is built: a teacher loads, DP-SGD calibrates.
  frozen = frozen._replace(methods=methods_lib.setup(methods, context))
  tx = methods_lib.optimizer(methods, tx, total_steps)
  state = {"params": trainable, "opt_state": tx.init(trainable)}
  # Place every leaf by its logical axis names (replicated for pmap).
  rules, strategy = (config.parallelism.logical_axis_rules,
                     config.parallelism.strategy)
  state_sharding = parallelism.state_shardings(state, mesh, rules, strategy)
  frozen_sharding = parallelism.state_shardings(frozen, mesh, rules, strategy)
  state = jax.device_put(state, state_sharding)
  frozen = jax.device_put(frozen, frozen_sharding)
  log.info("%d training examples, %d steps/epoch, %d steps, %s %s, padding "
           "efficiency %.3f; training %d of %d parameters",
           len(train_split), context.steps_per_epoch, total_steps,
           (f"packed {train_batches.examples_per_row} per row, row buckets"
            if train_batches.packed else "buckets"),
           list(train_batches.buckets), train_batches.padding_efficiency(0),
           partition.count(trainable),
           partition.count(trainable) + partition.count(frozen.params))

  # --- Update step and evaluators ---------------------------------------------------
  # The task's loss, wrapped by the methods; their gradient function.
  train_step = make_train_step(
      tx, methods_lib.wrap_loss(methods, task.loss_fn(graphdef)),
      grad_fn=methods_lib.grad_fn(methods, value_and_grad),
      transform=task.transform, seed=root_key(config), mesh=mesh,
      strategy=strategy, state_sharding=state_sharding,
      frozen_sharding=frozen_sharding)
  make_step = eval_step_factory(
      task, graphdef, seed=root_key(config), mesh=mesh,
      params_sharding=state_sharding["params"],
      frozen_sharding=frozen_sharding)
  batch_sharding = parallelism.batch_sharding(mesh)
  return Run(
      config=config, workdir=workdir, context=context, methods=methods,
      skipped=skipped, eval_splits=eval_splits, batch_sharding=batch_sharding,
      train_batches=train_batches, eval_batches=eval_batches, tx=tx,
      schedule=schedule, state=state, frozen=frozen,
      state_sharding=state_sharding, frozen_sharding=frozen_sharding,
      train_step=train_step, eval_step=make_step(False),
      evaluators=evaluators.build(config, task, eval_splits, eval_batches,
                                  make_step, batch_sharding, context))


# --- The loop ----------------------------------------------------------------------


def train_steps(run: Run, state, start_step: int, end_step: int):
  """Runs updates `start_step + 1 .. end_step`: the one place an update runs.

  Micro-batches come from the resume point on (the data position is the
  step), two ahead on the devices. Both the training loop and
  `research.bench` iterate this.

  Yields:
    (step, state, step metrics of its last micro-batch, [host batches]).
  """
  accum = run.config.optimizer.grad_accum_steps
  batches = parallelism.prefetch(
      run.train_batches.iterate(start_step * accum,
                                (end_step - start_step) * accum),
      run.batch_sharding, run.config.parallelism.prefetch)
  for step in range(start_step + 1, end_step + 1):
    hosts = []
    for micro in range(accum):
      host_batch, batch = next(batches)
      state, step_metrics = run.train_step(state, run.frozen, batch,
                                           (step - 1) * accum + micro)
      hosts.append(host_batch)
    yield step, state, step_metrics, hosts


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
  # --- Config, data, model, methods, steps (build) ---------------------------------
  run = build(config, workdir)
  is_main = jax.process_index() == 0
  accum = config.optimizer.grad_accum_steps
  total_steps, steps_per_epoch = run.total_steps, run.steps_per_epoch
  state, frozen = run.state, run.frozen
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
      thread.join()  # the first evaluation waits for its compiles, if running
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

  # --- Checkpoint restore ------------------------------------------------------------
  # Only the trainable parameters and their optimiser state are saved: the
  # frozen part comes back from the pre-trained checkpoint and the methods.
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
      run.train_batches.restore_state(extras["data_state"])
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
    if hasattr(run.train_batches, "state_at"):  # grain's iterator (a corpus)
      extras["data_state"] = run.train_batches.state_at(step * accum)
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

  # --- Training loop ---------------------------------------------------------------
  limit = methods_lib.step_limit(run.methods)  # e.g. a privacy budget
  if limit is not None and limit[0] < total_steps:
    log.warning("stopping after step %d of %d: %s", limit[0], total_steps,
                limit[1])
    total_steps = limit[0]
  summary = {}
  if start_step >= total_steps:
    log.info("run already finished at step %d", start_step)
  elif config.precompile:
    done = precompile(run.train_step, state, frozen, run.train_batches,
                      run.batch_sharding, start_step * accum,
                      (total_steps - start_step) * accum)
    log.info("compiled the update for the run's %d batch shapes: traced in "
             "%.1f s, compiled in %.1f s", done["shapes"],
             done["trace_seconds"], done["compile_seconds"])
    eval_compiles.append(evaluators.precompile_async(
        run.evaluators, state["params"], frozen))
  previous = None  # (step, metrics) of the last step, read one step late (no stall)
  eval_results = None
  bar = _progress_bar(total_steps, start_step, is_main)
  step = start_step
  failed = True
  try:
    for step, state, step_metrics, hosts in train_steps(run, state, start_step,
                                                        total_steps):
      eval_results = None
      # Counted on the host copies: reading device arrays would wait for them.
      for host_batch in hosts:
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
            "train/compilations": run.train_step._cache_size(),  # pylint: disable=protected-access
            **methods_lib.metrics(run.methods, step),
            # A method's gradient function's own (DP-SGD's clipping), of
            # the step's last micro-batch.
            **{k: float(v) for k, v in step_metrics.items()
               if k not in STEP_METRICS},
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
               "train_step_compilations": run.train_step._cache_size(),  # pylint: disable=protected-access
               "eval_step_compilations": run.eval_step._cache_size(),  # pylint: disable=protected-access
               # What a method trains (checkpoints hold this part only).
               "params/trainable": partition.count(state["params"]),
               "params/total": partition.count(state["params"])
                               + partition.count(frozen.params),
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
      json.dump(summary, f, indent=2, default=float)
  return summary


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


if __name__ == "__main__":
  from research import cli  # pylint: disable=g-import-not-at-top
  cli.main_train()
