"""A dense layer whose kernel is masked: unstructured pruning's layer.

`PrunedDense` is an `nnx.LinearGeneral` (built by the model's
`dense_factory`, so `kernel` and `bias` stay where Hugging Face import and
export expect them) that computes with `kernel * mask`:

  pruning_mask    `PruningMask`, 0/1 in the kernel's shape. A mask that
                  changes during training must travel in the trained,
                  donated, checkpointed state, and only `nnx.Param`s do
                  (`research.training.partition`), so it is a Param subclass;
                  the gradient never reaches it (stop_gradient) and the
                  optimiser never updates it: `schedule.pruning` does.
  pruning_scores  `PruningScores` (movement pruning only): Sanh et al.
                  (2020)'s importance scores S. The forward pass uses the
                  mask, and the gradient reaches S straight through it:
                  dL/dS = dL/dW' * W with W' = W * M.

Unstructured sparsity stores and computes as many numbers as the dense
layer: without sparse kernels it saves neither time nor memory (XLA has
none for these shapes on CPU or GPU). What it gives is a model whose zeros a
sparse format or kernel could exploit; `sparsity` reports them per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The encoder's dense layers that both papers prune (Q, K, V, the attention
# output, the FFN's two layers); names as `research.models.bert.make_dense`
# gives them ("output" matches "attention.output" too). The embeddings, the
# pooler and the classifier stay dense.
DEFAULT_TARGETS = ("query", "key", "value", "output", "intermediate")


class PruningMask(nnx.Param):
  """A kernel's 0/1 mask (see the module docstring: why a Param)."""


class PruningScores(nnx.Param):
  """Movement pruning's scores: trained by the gradient, straight-through."""


@jax.custom_vjp
def straight_through(mask, scores):
  """`mask` in the forward pass; in the backward pass the gradient that
  reaches the mask goes to `scores` unchanged (Sanh et al.'s estimator)."""
  del scores
  return mask


def _st_fwd(mask, scores):
  del scores
  return mask, None


def _st_bwd(_, g):
  return jnp.zeros_like(g), g


straight_through.defvjp(_st_fwd, _st_bwd)


class PrunedDense(nnx.LinearGeneral):
  """`nnx.LinearGeneral` computing with `kernel * mask` (module docstring).

  Args (besides `nnx.LinearGeneral`'s):
    scores: also keep movement pruning's scores (initialised to 0, as
      Sanh et al.'s `mask_init="constant"`, `mask_scale=0`).
  """

  def __init__(self, *args, scores: bool = False, **kw):
    super().__init__(*args, **kw)
    if self.batch_axis:
      raise ValueError("PrunedDense has no batch axes")
    kernel = self.kernel
    self.pruning_mask = PruningMask(jnp.ones(kernel.shape, kernel.dtype),
                                    **kernel.get_metadata())
    if scores:
      self.pruning_scores = PruningScores(jnp.zeros(kernel.shape, kernel.dtype),
                                          **kernel.get_metadata())
    else:
      self.pruning_scores = None

  def effective_kernel(self) -> jax.Array:
    """`kernel * mask`, the weights the layer computes with."""
    mask = jax.lax.stop_gradient(self.pruning_mask[...])
    if self.pruning_scores is not None:
      mask = straight_through(mask, self.pruning_scores[...])
    return self.kernel[...] * mask.astype(self.kernel.dtype)

  def __call__(self, inputs, out_sharding=None):
    # LinearGeneral's forward reads `self.kernel` itself; this is its
    # computation (no batch axes) with the masked kernel.
    kernel = self.effective_kernel()
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias),
                                              dtype=self.dtype)
    n_in = len(self.axis)
    axis = tuple(a % inputs.ndim for a in self.axis)
    out = jax.lax.dot_general(
        inputs, kernel, ((axis, tuple(range(n_in))), ((), ())),
        precision=self.precision, out_sharding=out_sharding)
    return out if bias is None else out + bias

  def merge(self):
    """Folds the mask into `kernel` (export, benchmarks): the layer then
    computes the same with its stored kernel alone. Idempotent."""
    self.kernel[...] = self.kernel[...] * self.pruning_mask[...].astype(
        self.kernel.dtype)


def pruned_layers(model):
  """(path, layer) of every `PrunedDense` of `model`, in model order."""
  return [(p, m) for p, m in nnx.iter_modules(model)
          if isinstance(m, PrunedDense)]


def merge(model):
  """Folds every `PrunedDense`'s mask into its kernel, in place."""
  for _, layer in pruned_layers(model):
    layer.merge()
  return model


def sparsity(model) -> dict[str, float]:
  """Fraction of zero weights in each dense kernel of `model` (the masked
  kernel where a layer has a mask), by the layer's path, in model order.

  Every kernel of the encoder layers is listed, pruned or not (a plain
  model's are ~0), and `"total"`: the zeros of all of them together.
  """
  out, zeros, size = {}, 0, 0
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, nnx.LinearGeneral) or "layers" not in path:
      continue
    kernel = (module.effective_kernel() if isinstance(module, PrunedDense)
              else module.kernel[...])
    kernel = np.asarray(kernel)
    n = int((kernel == 0).sum())
    out["/".join(map(str, path))] = n / kernel.size
    zeros, size = zeros + n, size + kernel.size
  out["total"] = zeros / max(size, 1)
  return out
