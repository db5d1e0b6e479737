"""The run's data loaders, from its config and splits.

`make_batchers` gives the training loader (micro-batches in the sampler's
order, length-bucketed or packed) and one evaluation loader per split,
checked against the mesh; `check_data_files` fails fast on a missing file;
`num_buckets` is the platform's default bucket count.
"""

from __future__ import annotations

import functools
import os

import jax

from research import parallelism
from research.configs.plugins import ConfigError
from research.data import batching
from research.data.splits import parse_eval_files


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


def make_batchers(config, train_split, eval_splits, mesh, sampler=None,
                  split_at=None):
  """The training loader and one eval loader per split, checked against the mesh.

  The training loader yields micro-batches (`batch_size / grad_accum_steps`
  examples, in the order of `sampler`: `(name, options)`, by default
  `config.data.sampler`'s; a method may replace it, as DP-SGD's Poisson
  sampling does); eval loaders reuse its buckets, so
  evaluation adds no shapes. With packing (`data.examples_per_row` > 1) the
  training buckets are row lengths, and evaluation (never packed) chooses
  its own. With `split_at` (`epoch -> training split`, a method's set made
  anew each epoch) the training loader is a `batching.EpochBatcher`.

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
      name: batching.Batcher(split, config.eval_batch_size, eval_buckets,
                         shuffle=False, **hosts)
      for name, split in eval_splits.items()}
  return train_batches, eval_batches
