"""Unlabelled transfer text: more training examples for the teacher to label.

`append` reads a file as the run reads `config.data`'s files (the task's
columns and featuriser; the label column may be absent and is ignored),
and appends its examples to the training split with a per-example field
that is 1 on the original examples and 0 on these: the distillation terms
use every example, the hard loss only the labelled ones.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from research.configs.plugins import ConfigError
from research.data import splits
from research.data.splits import Field


def append(config, tokenizer, split, path: str, field: str, where: str):
  """`split` followed by the examples of `path`, with `field` (1: labelled).

  Raises:
    ConfigError: no such file, or a task whose unlabelled examples have
      other fields than the training split's.
  """
  from research import tasks  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise ConfigError(f"{where}={path!r}: no such file")
  extra = splits.load_file(config, tokenizer, tasks.load(config, tokenizer),
                           path, "unlabelled", split.label_names,
                           require_labels=False, where=where)
  if [f.name for f in extra.fields] != [f.name for f in split.fields]:
    raise ConfigError(
        f"{where}={path!r}: its examples have the fields "
        f"{[f.name for f in extra.fields]}, the training split "
        f"{[f.name for f in split.fields]}")
  arrays = {k: np.concatenate([v, extra.arrays[k].astype(v.dtype)])
            for k, v in split.arrays.items()}
  arrays[field] = np.concatenate([np.ones(len(split), np.float32),
                                  np.zeros(len(extra), np.float32)])
  return dataclasses.replace(
      split, where=f"{split.where} + {extra.where} (unlabelled)",
      offsets=np.concatenate([split.offsets,
                              extra.offsets[1:] + split.offsets[-1]]),
      arrays=arrays, fields=split.fields + (Field(field, False, np.float32,
                                                  0.0),),
      rows=np.concatenate([split.rows, extra.rows]))
