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

The file reads top to bottom as the run does: config and workdir, data, model
and optimiser, the update and eval steps, checkpoint restore, the loop.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from flax import nnx

from research import data, parallelism
from research.configs import ConfigError, validate
from research.evaluation import metrics as metrics_lib
from research.models import hf
from research.training import host_memory
from research.training import xla_flags
from research.training import optimizers
from research.training.checkpointing import Checkpointer, CheckpointError, abstract_like
from research.training.tracker import create_tracker

log = logging.getLogger("research.train")

# Exit status after saving on preemption (SIGTERM), so schedulers restart us.
PREEMPTED_EXIT_CODE = 143
# Tasks whose training inputs research.data builds today.
TRAINABLE_TASKS = ("sequence_classification",)


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite losses in a row)."""


class Preempted(Exception):
  """Raised after the preemption checkpoint is written."""


def per_example_loss(logits, batch, regression):
  """Loss per row and predictions: class ids, or the regression output.

  Rows with weight 0 (padding rows of the last eval batch, examples without a
  label) are masked by the callers' weighted sums.
  """
  if regression:
    pred = logits[:, 0]
    return jnp.square(pred - batch["labels"]), pred
  labels = jnp.maximum(batch["labels"], 0)  # -1 (no label) has weight 0
  return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
          jnp.argmax(logits, axis=-1))


def packing_inputs(batch):
  """The packed-row inputs of a batch (`research.data.batching`), if any."""
  return {k: batch[k] for k in ("segment_ids", "example_starts") if k in batch}


def make_train_step(graphdef, tx, *, regression, seed, mesh, strategy,
                    state_sharding):
  """The jitted update: `(state, batch, micro_step) -> (state, metrics)`.

  The loss is the weighted mean over the global batch, computed as
  sum(loss * weight) / total weight so that every strategy and device count
  gives the same gradient. `state` is donated: its buffers are reused.

  Args:
    graphdef: the model's `nnx.GraphDef` (structure without weights).
    tx: the optax transformation (`optimizers.build_optimizer`).
    regression: single-output regression head.
    seed: dropout keys are `fold_in(key(seed), micro_step)`: a resumed run
      draws the same masks.
    mesh: the device mesh.
    strategy: "jit" (sharded program) or "pmap" (per-device program with an
      explicit gradient all-reduce, via shard_map).
    state_sharding: NamedShardings of `{"params", "opt_state"}`.
  """
  base_key = jax.random.key(seed)
  batch_sharding = parallelism.batch_sharding(mesh)
  replicated = parallelism.replicated(mesh)

  def loss_fn(params, batch, dropout_key, total_weight):
    model = nnx.merge(graphdef, params)
    logits = model(batch["input_ids"], batch["attention_mask"],
                   batch["token_type_ids"], **packing_inputs(batch),
                   rngs=nnx.Rngs(dropout=dropout_key))
    loss, _ = per_example_loss(logits, batch, regression)
    return (loss * batch["weights"]).sum() / total_weight

  def apply(state, loss, grads):
    # The optimiser skips (and counts) a step whose gradients hold a NaN or
    # Inf; a loss that overflows while its gradients stay finite (a squared
    # error of a huge label) must be skipped too, so it poisons them. One
    # leaf suffices (both optimiser paths test every leaf or the global
    # norm): the smallest, since a select over every leaf costs a pass over
    # the 47 MB word-embedding gradient (1-3% of a MiniLM step on CPU).
    leaves, treedef = jax.tree.flatten(grads)
    i = min(range(len(leaves)), key=lambda j: leaves[j].size)
    leaves[i] = jnp.where(jnp.isfinite(loss), leaves[i], jnp.nan)
    grads = jax.tree.unflatten(treedef, leaves)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {
        "loss": loss, "grad_norm": optax.tree.norm(grads),
        "bad_steps": optimizers.bad_step_count(opt_state)}

  if strategy == "jit":
    def step(state, batch, micro_step):
      key = jax.random.fold_in(base_key, micro_step)
      total = jnp.maximum(batch["weights"].sum(), 1.0)
      loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key,
                                                total)
      return apply(state, loss, grads)
  else:
    axes = parallelism.BATCH_AXES

    def per_device(state, batch, micro_step):
      # Each device differentiates its share of the global mean; the psum is
      # the gradient all-reduce.
      key = jax.random.fold_in(jax.random.fold_in(base_key, micro_step),
                               jax.lax.axis_index(axes))
      total = jnp.maximum(jax.lax.psum(batch["weights"].sum(), axes), 1.0)
      loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key,
                                                total)
      loss, grads = jax.lax.psum((loss, grads), axes)
      return apply(state, loss, grads)

    # check_vma=False: with it on, JAX would already sum the gradients of
    # the replicated parameters in the transpose, and the psum above would
    # count them once per device. Off, the program is the classic pmap one.
    step = jax.shard_map(per_device, mesh=mesh,
                         in_specs=(jax.P(), jax.P(axes), jax.P()),
                         out_specs=(jax.P(), jax.P()), check_vma=False)
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding, None),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


def make_eval_step(graphdef, *, regression, mesh, params_sharding):
  """The jitted eval: `(params, batch) -> (weighted loss sum, predictions)`."""
  def step(params, batch):
    logits = nnx.merge(graphdef, params)(
        batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    loss, pred = per_example_loss(logits, batch, regression)
    return (loss * batch["weights"]).sum(), pred
  return jax.jit(step, in_shardings=(params_sharding,
                                     parallelism.batch_sharding(mesh)),
                 out_shardings=parallelism.replicated(mesh))


def precompile(train_step, state, batcher, batch_sharding, start, count):
  """Compiles `train_step` for every batch width of micro-batches [start, +count).

  The widths come from the data plan (`Batcher.planned_widths`), so a bucket
  first met late in the run (a rare long batch, packed rows) does not stall
  every host with a compile there; the jitted call later finds the
  executable in JAX's in-memory cache and only re-traces. Lowering reads the
  arguments' shapes and shardings only: `state` is not donated here.

  Returns:
    The number of widths compiled.
  """
  widths = batcher.planned_widths(start, count)
  for micro_step in widths.values():
    batch = parallelism.shard_batch(batcher.batch_at(micro_step), batch_sharding)
    train_step.lower(state, batch, micro_step).compile()
  return len(widths)


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


def load_model(config, model_dir):
  """The Hugging Face checkpoint as `config.model` asks for it.

  The task's head, dtypes, attention implementation, remat, and dropout
  rates (`dropout_overrides`).
  """
  model, _ = hf.load_pretrained(
      str(model_dir), config.task, config.num_labels, dtype=config.model.dtype,
      param_dtype=config.model.param_dtype,
      attention_impl=config.model.attention_impl, remat=config.model.remat,
      config_overrides=dropout_overrides(config.model), seed=config.seed)
  return model


def make_batchers(config, train_split, eval_splits, mesh):
  """The training loader and one eval loader per split, checked against the mesh.

  The training loader yields micro-batches (`batch_size / grad_accum_steps`
  examples); eval loaders reuse its buckets, so evaluation adds no shapes.
  With packing (`data.examples_per_row` > 1) the training buckets are row
  lengths, and evaluation (never packed) chooses its own from its lengths.

  Returns:
    (train Batcher, {split name: eval Batcher}).

  Raises:
    parallelism.ParallelismError: a batch size the data axes do not divide.
  """
  accum = config.optimizer.grad_accum_steps
  per_row = config.data.examples_per_row
  what = ("config.batch_size / grad_accum_steps" if accum > 1
          else "config.batch_size")
  if per_row > 1:
    what = f"({what}) / config.data.examples_per_row (packed rows)"
  parallelism.check_batch_size(config.batch_size // accum // per_row, mesh,
                               what)
  parallelism.check_batch_size(config.eval_batch_size, mesh,
                               "config.eval_batch_size")
  hosts = dict(process_index=jax.process_index(),
               process_count=jax.process_count())
  train_batches = data.Batcher(
      train_split, config.batch_size // accum, config.data.buckets,
      seed=config.seed, shuffle=True, examples_per_row=per_row, **hosts)
  eval_buckets = () if per_row > 1 else train_batches.buckets
  eval_batches = {
      name: data.Batcher(split, config.eval_batch_size, eval_buckets,
                         shuffle=False, **hosts)
      for name, split in eval_splits.items()}
  return train_batches, eval_batches


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
  # --- Config and workdir -------------------------------------------------------
  validate(config)
  if config.task not in TRAINABLE_TASKS:
    raise ConfigError(f"config.task={config.task!r}: training data for this "
                      f"head is not built yet; trainable: {', '.join(TRAINABLE_TASKS)}")
  _check_data_files(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  regression = config.num_labels == 1

  # --- Data -------------------------------------------------------------------
  model_dir = hf.resolve(config.model.name)
  tokenizer = data.load_tokenizer(str(model_dir))
  labels_path = os.path.join(workdir, "labels.json")
  saved_labels = (data.load_label_names(labels_path)
                  if os.path.exists(labels_path) else None)
  train_split, eval_splits, label_names, skipped = data.load_splits(
      config, tokenizer, cache_dir=os.path.join(workdir, "cache"),
      label_names=saved_labels)
  if train_split is None:
    raise ConfigError("no training split: set config.data.train_file "
                      "(local) or config.data.train_split")
  if not regression and len(label_names) != config.num_labels:
    raise ConfigError(
        f"config.num_labels={config.num_labels} but the data has "
        f"{len(label_names)} labels: {', '.join(map(str, label_names))}")
  if is_main:
    data.save_label_names(labels_path, label_names)
  # Rows dropped under data.bad_rows="skip", for the summary: nothing is
  # dropped silently.
  skipped_counts = {
      f"data/skipped/{split}/{reason.replace(' ', '_')}": count
      for split, counts in skipped.items() for reason, count in counts.items()}
  for split, counts in skipped.items():
    log.warning("skipped rows in %s (data.bad_rows='skip'): %s", split, counts)

  mesh = parallelism.make_mesh(config.parallelism)
  accum = config.optimizer.grad_accum_steps
  train_batches, eval_batches = make_batchers(config, train_split, eval_splits,
                                              mesh)
  micro_steps_per_epoch = train_batches.steps_per_epoch  # DataError if < 1
  try:
    total_steps = optimizers.steps_from_config(config, micro_steps_per_epoch)
    # Built before the model loads: a warmup longer than the run fails fast.
    tx = optimizers.build_optimizer(config.optimizer, total_steps)
    schedule = optimizers.learning_rate_schedule(config.optimizer, total_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  steps_per_epoch = max(1, micro_steps_per_epoch // accum)
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else steps_per_epoch)
  checkpoint_every = (config.checkpoint_every_steps
                      if config.checkpoint_every_steps > 0 else eval_every)
  log.info("%d training examples, %d steps/epoch, %d steps, %s %s, padding "
           "efficiency %.3f", len(train_split), steps_per_epoch, total_steps,
           (f"packed {train_batches.examples_per_row} per row, row buckets"
            if train_batches.packed else "buckets"),
           list(train_batches.buckets), train_batches.padding_efficiency(0))

  # --- Model and optimiser ------------------------------------------------------
  model = load_model(config, model_dir)
  if config.data.max_length > model.cfg.max_position_embeddings - model.cfg.position_offset:
    raise ConfigError(
        f"config.data.max_length={config.data.max_length} exceeds the "
        f"model's {model.cfg.max_position_embeddings} positions")
  graphdef, params = nnx.split(model, nnx.Param)
  state = {"params": params, "opt_state": tx.init(params)}
  # Place every leaf by its logical axis names (replicated for pmap).
  state_sharding = parallelism.state_shardings(
      state, mesh, config.parallelism.logical_axis_rules,
      config.parallelism.strategy)
  state = jax.device_put(state, state_sharding)

  # --- Update and eval steps ----------------------------------------------------
  train_step = make_train_step(
      graphdef, tx, regression=regression, seed=config.seed, mesh=mesh,
      strategy=config.parallelism.strategy, state_sharding=state_sharding)
  eval_step = make_eval_step(graphdef, regression=regression, mesh=mesh,
                             params_sharding=state_sharding["params"])
  batch_sharding = parallelism.batch_sharding(mesh)

  def evaluate(params) -> dict[str, float]:
    results = {}
    for name, batcher in eval_batches.items():
      if not eval_splits[name].has_labels:
        continue
      preds, labels, weights, loss_sum = [], [], [], 0.0
      for host_batch, batch in parallelism.prefetch(
          batcher.eval_batches(), batch_sharding, config.parallelism.prefetch):
        loss, pred = eval_step(params, batch)
        loss_sum += float(loss)
        # Global arrays -> numpy on every host (multi-host safe).
        pred, label, weight = multihost_utils.process_allgather(
            (pred, batch["labels"], batch["weights"]), tiled=True)
        preds.append(pred)
        labels.append(label)
        weights.append(weight)
      preds, labels, weights = map(np.concatenate, (preds, labels, weights))
      prefix = "eval/" if len(eval_batches) == 1 else f"eval/{name}/"
      results[prefix + "loss"] = float(loss_sum / weights.sum())
      for metric, value in metrics_lib.compute(config.metrics, preds, labels,
                                               weights).items():
        results[prefix + metric] = value
    return results

  # The first eval split selects the best checkpoint and drives early stopping.
  first_split = next(iter(eval_batches), None)
  best_key = ("eval/" if len(eval_batches) == 1 else f"eval/{first_split}/") \
      + config.eval_metric
  sign = 1.0 if config.eval_metric_mode == "max" else -1.0

  # --- Checkpoint restore -------------------------------------------------------
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
              "epoch": step // steps_per_epoch, "label_names": list(label_names),
              "loss_window": [float(x) for x in jax.device_get(window["loss"])]}
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
  summary = {}
  if start_step >= total_steps:
    log.info("run already finished at step %d", start_step)
  elif config.precompile:
    t0 = time.perf_counter()
    shapes = precompile(train_step, state, train_batches, batch_sharding,
                        start_step * accum, (total_steps - start_step) * accum)
    log.info("compiled the update for the run's %d batch shapes in %.1f s",
             shapes, time.perf_counter() - t0)
  previous = None  # (step, metrics) of the last step, read one step late (no stall)
  eval_results = None
  bar = _progress_bar(total_steps, start_step, is_main)
  # Micro-batches from the resume point on; the data position is the step.
  batches = parallelism.prefetch(
      train_batches.iterate(start_step * accum, (total_steps - start_step) * accum),
      batch_sharding, config.parallelism.prefetch)
  step = start_step
  failed = True
  try:
    for step in range(start_step + 1, total_steps + 1):
      eval_results = None
      for micro in range(accum):
        host_batch, batch = next(batches)
        state, step_metrics = train_step(state, batch, (step - 1) * accum + micro)
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
            "train/learning_rate": float(schedule(step - 1)),
            "train/grad_norm": float(step_metrics["grad_norm"]),
            "train/bad_steps_total": int(optimizers.total_bad_steps(state["opt_state"])),
            "train/examples_per_second": window["examples"] / elapsed,
            "train/tokens_per_second": window["tokens"] / elapsed,
            "train/epoch": step / steps_per_epoch,
            # Batch shapes met so far (each traced once; with
            # config.precompile all were compiled before step 1).
            "train/compilations": train_step._cache_size(),  # pylint: disable=protected-access
        }
        tracker.log(step, train_metrics)
        bar.set_postfix(loss=f"{train_metrics['train/loss']:.4f}",
                        ex_s=f"{train_metrics['train/examples_per_second']:.1f}")
        window = {"loss": [], "examples": 0, "tokens": 0,
                  "start": time.perf_counter()}
      bar.update(1)

      if eval_batches and (step % eval_every == 0 or step == total_steps):
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
               "eval_step_compilations": eval_step._cache_size(),  # pylint: disable=protected-access
               **skipped_counts}
    if eval_results is None and eval_batches:
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
