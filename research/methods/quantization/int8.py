"""int8 quantisation of the model's dense layers with google's qwix.

qwix intercepts the JAX ops a model's `__call__` runs (`jax.lax.dot_general`,
which every `nnx.LinearGeneral` of this model calls) and swaps in quantised
ones, chosen by rules on the module path; it needs no change to the model.
Each scheme here quantises the dense layers' `dot_general`s only
(`op_names`): the attention's score and weighted-sum einsums, the softmax,
LayerNorm, GELU and the embedding lookups stay float32.

  int8          weights int8 (per output channel, absmax) and activations
                int8 (per token, dynamic range, absmax): int8 x int8 ->
                int32 matmuls (qwix `PtqProvider`, XLA's integer dot).
  int8_weights  weights int8, activations float32: the stored model is
                smaller; the matmul runs in float32 on the dequantised
                weights.

`ptq(model, scheme)` quantises a trained model's weights (post-training
quantisation); `qat(model, scheme)` makes a model that trains with the
scheme simulated in its forward pass (qwix `QtProvider`: quantise-dequantise
with straight-through gradients), whose weights `ptq` then quantises for
serving. qwix 0.1's quantised state (`WithAux` of a `QArray` with `qvalue`
and `scale`) is its own, not a stable format: checkpoints and exports stay
float32 and a model is quantised when it is loaded (a second for MiniLM);
`save_state` writes the quantised state only to measure its size on disk.
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SCHEMES = {"int8": {"weight_qtype": "int8", "act_qtype": "int8"},
           "int8_weights": {"weight_qtype": "int8"}}


def check_scheme(scheme: str, field: str) -> str:
  if scheme not in SCHEMES:
    raise ValueError(f"{field}={scheme!r}; valid: {', '.join(SCHEMES)}")
  return scheme


def rules(scheme: str, module_path: str = ".*", rule_class=None) -> list:
  """The qwix rules of a scheme: the dense layers' dot_generals whose
  module path (e.g. "bert/layers/0/attention/query") matches the regex."""
  import qwix  # pylint: disable=import-outside-toplevel
  cls = rule_class or qwix.QuantizationRule
  return [cls(module_path=module_path, op_names=("dot_general",),
              **SCHEMES[check_scheme(scheme, "scheme")])]


def _sample_inputs():
  # qwix runs an NNX model once to find and convert its weights; the values
  # do not matter.
  ids = jnp.ones((1, 8), jnp.int32)
  return ids, jnp.ones((1, 8), jnp.int32)


def ptq(model: nnx.Module, scheme: str = "int8", module_path: str = ".*"):
  """A copy of `model` with its dense layers' weights quantised (PTQ).

  `model` may be a `qat` model: its training interception is replaced.
  """
  import qwix  # pylint: disable=import-outside-toplevel
  return qwix.quantize_model(model, qwix.PtqProvider(rules(scheme, module_path)),
                             *_sample_inputs())


def qat(model: nnx.Module, scheme: str = "int8", module_path: str = ".*"):
  """A copy of `model` that runs `scheme` simulated (quantisation-aware
  training); its parameters stay float32 and are what the optimiser trains."""
  import qwix  # pylint: disable=import-outside-toplevel
  return qwix.quantize_model(
      model, qwix.QtProvider(rules(scheme, module_path, qwix.QtRule)),
      *_sample_inputs())


def flat_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
  """Every array of the model's state by its '/'-joined path (int8 stays int8)."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
            for k in path]
    keys = [k for k in keys if k != "value"]
    out["/".join(keys)] = np.ascontiguousarray(np.asarray(value))
  return out


def save_state(model: nnx.Module, path: str) -> int:
  """Writes the model's state (quantised or not) as safetensors; returns
  the file's size in bytes: the "size on disk" of any model, in one format."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  safetensors.numpy.save_file(flat_arrays(model), path)
  return os.path.getsize(path)


def size_on_disk(model: nnx.Module) -> int:
  """`save_state`'s bytes, written to a temporary file."""
  with tempfile.TemporaryDirectory() as tmp:
    return save_state(model, os.path.join(tmp, "model.safetensors"))
