"""Trainable and frozen parts of a model: one split used by every entry point.

`split_model(model, trainable)` splits an NNX model into its structure and
three states:

  trainable  the `nnx.Param`s the filter selects: updated by the optimiser,
             donated to the update step, saved in checkpoints;
  frozen     the other `nnx.Param`s (a base model under LoRA or BitFit, a
             teacher): read by the step, never updated nor checkpointed;
  rest       every other `nnx.Variable` (a pruning mask, a quantisation
             scale): constants of the run, travelling with `frozen`.

`frozen` and `rest` go to the step as one non-donated argument, a
`Frozen(params, rest, methods)`, beside the state the methods own
(`methods`: {method name: pytree}, e.g. a teacher's weights or the weights a
run started from; `research.methods.Method.setup`). `merge` puts a model
back together. Full fine-tuning is the filter `nnx.Param` (the default):
`frozen` is then empty and costs nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx


class Frozen(NamedTuple):
  """What the step reads but never updates, donates nor checkpoints.

  Attributes:
    params: the model's frozen `nnx.Param`s (a LoRA base, BitFit's weights).
    rest: the model's other variables (constants of the run).
    methods: {method name: its own state} (`Method.setup`'s return: a
      teacher's weights, a Fisher diagonal); sharded by the mesh like the
      rest, by the logical axis names its `nnx.Variable`s carry.
  """
  params: Any
  rest: Any
  methods: dict = {}


def split_model(model: nnx.Module, trainable=nnx.Param):
  """Splits `model` by an nnx filter into (graphdef, trainable, frozen, rest).

  Args:
    model: the NNX model.
    trainable: an nnx filter (a Variable type, `nnx.PathContains`, a
      `(path, value) -> bool` callable, ...) of the weights to train; it is
      intersected with `nnx.Param`.

  Returns:
    (graphdef, trainable, frozen, rest): the structure and three
    `nnx.State`s; together they are the whole model.
  """
  return nnx.split(model, nnx.All(nnx.Param, trainable), nnx.Param, ...)


def merge(graphdef, trainable, frozen):
  """The model from `split_model`'s pieces; `frozen` is a `Frozen` (or a
  `(frozen params, rest)` pair)."""
  return nnx.merge(graphdef, trainable, frozen[0], frozen[1])


def count(state) -> int:
  """Number of scalars in a state."""
  return sum(int(x.size) for x in jax.tree.leaves(state))
