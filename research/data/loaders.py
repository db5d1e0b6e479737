"""The run's data loaders, from its config and splits.

`make_batchers` gives the training loader (micro-batches in the sampler's
order, length-bucketed or packed) and one evaluation loader per split,
checked against the mesh; `check_data_files` fails fast on a missing file;
`choose_buckets` the number of length buckets that minimises compile time
plus padded compute.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

from research import parallelism
from research.configs.plugins import ConfigError
from research.data import batching
from research.data.splits import parse_eval_files

log = logging.getLogger(__name__)


def check_data_files(config) -> None:
  """Fails now, naming the field, if a configured data file does not exist.

  The data pipeline would say so too, but only after the tokenizer loaded;
  this way a typo in a path costs no time.
  """
  if config.data.source not in ("local", "hf"):
    return
  files = [("train_file", config.data.train_file)] if config.data.train_file else []
  files += [("eval_file", path)
            for path in parse_eval_files(config.data.eval_file).values()]
  for field, path in files:
    if not os.path.isfile(path):
      value = config.data[field]
      raise ConfigError(f"config.data.{field}={value!r}: no such file" +
                        (f" {path!r}" if path != value else ""))


# The most buckets an automatic choice considers per platform
# (config.data.num_buckets <= 0): each is a compilation, 20-40 s for
# bert-base on an H200 against ~10 s for the MiniLM on 2 CPU cores, where
# padding is what costs (BENCHMARKS.md).
AUTO_NUM_BUCKETS = {"cpu": 8}
ACCELERATOR_NUM_BUCKETS = 2
# What a batch shape costs, per platform, for `choose_buckets`: seconds to
# compile one layer of the train and eval steps, and the FLOP/s a step
# reaches (estimates: the MiniLM on 2 CPU cores compiled 8 shapes in 70 s
# and trained at ~1.8e11 FLOP/s; bert-base on an H200 compiled a shape in
# 20-40 s). Rough on purpose: they decide between 2 and 8 shapes, not 5 and 6.
COMPILE_SECONDS_PER_LAYER = {"cpu": 1.5, "gpu": 2.5, "tpu": 1.5}
FLOPS_PER_SECOND = {"cpu": 9e10, "gpu": 1e14, "tpu": 1e14}  # cpu: per core


def num_buckets(config, mesh) -> int:
  """`config.data.num_buckets`, or the platform's most when <= 0."""
  if config.data.num_buckets > 0:
    return config.data.num_buckets
  platform = mesh.devices.flat[0].platform
  return AUTO_NUM_BUCKETS.get(platform, ACCELERATOR_NUM_BUCKETS)


def choose_buckets(lengths, max_length, examples, model_cfg, platform,
                   most=8, cores=None, multiple=4) -> tuple[tuple, dict]:
  """The buckets that minimise compile time plus padded compute of a run.

  For k = 1..most buckets (`batching.auto_buckets`: the least padding for
  k), the estimate is k compilations plus the training FLOPs of `examples`
  examples, each padded to its bucket (6 FLOPs per matmul weight and token,
  plus attention's 12 x layers x hidden x width), at the platform's rate.
  A 250-step run of short texts then compiles 2-3 shapes, a long one all 8.

  Returns:
    (buckets, {"buckets", "compile_s", "compute_s", "total_s"} of the
    choice, and "total_s_most" of `most` buckets, for the log).
  """
  lengths = np.minimum(np.asarray(lengths, np.int64), max_length)
  layers, hidden = model_cfg.num_hidden_layers, model_cfg.hidden_size
  per_token = 6.0 * layers * (4 * hidden ** 2
                              + 2 * hidden * model_cfg.intermediate_size)
  rate = FLOPS_PER_SECOND.get(platform, FLOPS_PER_SECOND["gpu"])
  if platform == "cpu":
    rate *= cores or len(os.sched_getaffinity(0))
  compile_s = COMPILE_SECONDS_PER_LAYER.get(platform, 2.5) * layers
  scale = examples / max(1, len(lengths))  # epochs of the data plan
  options = []
  for k in range(1, most + 1):
    buckets = batching.auto_buckets(lengths, max_length, k, multiple)
    padded = np.asarray(buckets)[np.searchsorted(buckets, lengths)]
    flops = np.sum(padded * (per_token + 12.0 * layers * hidden * padded))
    options.append({"buckets": tuple(buckets), "compile_s": k * compile_s,
                    "compute_s": scale * flops / rate})
  for o in options:
    o["total_s"] = o["compile_s"] + o["compute_s"]
  best = min(options, key=lambda o: o["total_s"])
  return best["buckets"], {**best, "total_s_most": options[-1]["total_s"]}


def make_batchers(config, train_split, eval_splits, mesh, sampler=None,
                  split_at=None, model_cfg=None):
  """The training loader and one eval loader per split, checked against the mesh.

  The training loader yields micro-batches (`batch_size / grad_accum_steps`
  examples, in the order of `sampler`: `(name, options)`, by default
  `config.data.sampler`'s; a method may replace it, as DP-SGD's Poisson
  sampling does); eval loaders reuse its buckets, so
  evaluation adds no shapes. With packing (`data.examples_per_row` > 1) the
  training buckets are row lengths, and evaluation (never packed) chooses
  its own. With `split_at` (`epoch -> training split`, a method's set made
  anew each epoch) the training loader is a `batching.EpochBatcher`.
  Without configured buckets, `choose_buckets` picks as many as pay for
  their compilation (`model_cfg`: the encoder's, read from the checkpoint
  when not given).

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
  sampler, sampler_options = sampler or (config.data.sampler,
                                         config.data.sampler_options)
  batcher = (batching.Batcher if split_at is None else
             functools.partial(batching.EpochBatcher, split_at=split_at))
  buckets = tuple(config.data.buckets)
  if not buckets and per_row == 1 and config.data.num_buckets <= 0:
    # As many shapes as pay for their compilation in this run.
    from research.models import hf  # pylint: disable=import-outside-toplevel
    examples = (config.total_steps * config.batch_size
                if config.total_steps > 0
                else config.num_epochs * len(train_split))
    buckets, estimate = choose_buckets(
        np.diff(train_split.offsets), train_split.max_length, examples,
        model_cfg or hf.read_config(hf.resolve(config.model.name)),
        mesh.devices.flat[0].platform, most=num_buckets(config, mesh),
        multiple=config.data.bucket_multiple)
    log.info("buckets %s: estimated %.0f s to compile and %.0f s to train "
             "(%.0f s with %d buckets)", list(buckets), estimate["compile_s"],
             estimate["compute_s"], estimate["total_s_most"],
             num_buckets(config, mesh))
  train_batches = batcher(
      train_split, config.batch_size // accum, buckets,
      seed=config.seed, shuffle=True, examples_per_row=per_row,
      sampler=sampler, sampler_options=sampler_options,
      num_buckets=num_buckets(config, mesh),
      multiple=config.data.bucket_multiple, **hosts)
  if train_batches.batch_size != config.batch_size // accum:
    parallelism.check_batch_size(
        train_batches.batch_size, mesh,
        f"the padded batch of sampler {sampler!r} "
        "(config.data.sampler_options.max_batch_size)")
  # Evaluation gets as many shapes (compilations) as training, with widths
  # fitted to its own in-order batches: a few-shot run's 32 training
  # sentences chose widths that padded nearly every test batch to max_length.
  eval_buckets = tuple(config.data.buckets) if per_row == 1 else ()
  eval_count = (len(train_batches.buckets) if per_row == 1
                else num_buckets(config, mesh))
  eval_batches = {
      name: batching.Batcher(split, config.eval_batch_size, eval_buckets,
                             shuffle=False, num_buckets=eval_count, **hosts)
      for name, split in eval_splits.items()}
  return train_batches, eval_batches
