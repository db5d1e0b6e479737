"""The input pipeline: sources -> checked rows -> cached features -> batches.

Typical use by the trainer (`research.train.build`):

  task = tasks.load(config, tokenizer)
  train, evals, label_names, skipped = data.load_splits(
      config, tokenizer, cache_dir=os.path.join(workdir, "cache"), task=task)
  data.save_label_names(os.path.join(workdir, "labels.json"), label_names)
  batcher = data.Batcher(train, config.batch_size, config.data.buckets,
                         seed=config.seed, shuffle=True,
                         sampler=config.data.sampler,
                         process_index=jax.process_index(),
                         process_count=jax.process_count())
  for batch in batcher.iterate(start_step): ...
  # Evaluate with the training buckets: no extra compilations.
  for batch in data.Batcher(evals["validation"], config.eval_batch_size,
                            batcher.buckets, shuffle=False, ...).eval_batches():
    ...

The task featurises rows (`research.tasks`); a split's fields (`Field`: per
token or per feature, dtype, pad value) are gathered and padded by the
Batcher with no per-task code. `data.buckets` empty means `auto_buckets` of
the training lengths; `data.examples_per_row` > 1 packs training batches
(`Batcher`, `pack_rows`); the epoch order is a sampler (`samplers`).
`EpochBatcher` serves a training set made anew each epoch (the `augment` method).
"""

from research.data.batching import Batcher
from research.data.batching import EpochBatcher
from research.data.batching import auto_buckets
from research.data.batching import example_lengths
from research.data.batching import make_buckets
from research.data.batching import pack_rows
from research.data.batching import padding_efficiency
from research.data.errors import DataError
from research.data.labels import load_label_names
from research.data.labels import save_label_names
from research.data.splits import Field
from research.data.splits import TokenizedSplit
from research.data.splits import eval_split_names
from research.data.splits import load_splits
from research.data.splits import parse_eval_files
from research.data.tokenize import load_tokenizer
from research.data.tokenize import tokenizer_fingerprint

__all__ = [
    "Batcher", "DataError", "EpochBatcher", "Field", "TokenizedSplit",
    "auto_buckets", "eval_split_names", "example_lengths",
    "load_label_names", "load_splits", "load_tokenizer", "make_buckets",
    "pack_rows", "padding_efficiency",
    "parse_eval_files", "save_label_names", "tokenizer_fingerprint",
]
