"""Attention-head importance and the heads to remove (Michel et al. 2019).

"Are Sixteen Heads Really Better than One?": gate each head's output by
xi_h (the model is the one at xi = 1); a head's importance is the expected
absolute sensitivity of the loss to its gate,

    I_h = E_x | dL(x) / dxi_h |,

over examples x (here the training split, never the dev set the pruned model
is scored on). Gating head h scales its slice of the attention-output kernel,
so dL/dxi_h = <dL/dW_o[h], W_o[h]>; the gradients are taken per example
(`jax.vmap`) with respect to the gates. Scores are normalised per layer by
their l2 norm (the paper's section 4.1), then the lowest-scoring heads over
all layers are removed, keeping at least one per layer. The cut, which
shrinks every attention matmul, is `BertModel.prune_heads`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _gated_params(params, gates):
  """`params` with each layer's attention-output kernel scaled per head."""
  flat = []
  for path, var in nnx.to_flat_state(params):
    if (len(path) >= 6 and path[0] == "bert" and path[1] == "layers"
        and path[3:] == ("attention", "output", "kernel")):
      var = var.replace(var[...] * gates[path[2]][:, None, None].astype(var.dtype))
    flat.append((path, var))
  return nnx.from_flat_state(flat)


def head_importance(model, task, batches) -> np.ndarray:
  """I_h = mean over examples of |dL(x)/dxi_h|: float64 [layers, heads].

  Args:
    model: an unpruned model with a task head (evaluation mode: no dropout).
    task: its `research.tasks` task (forward and per-example loss).
    batches: an iterable of batches (`data.Batcher.batch_at`); rows of
      weight 0 (padding) are not counted.
  """
  bert = model.bert
  if bert.pruned_heads:
    raise ValueError(f"head importance needs an unpruned model; this one has "
                     f"pruned heads {bert.pruned_heads}")
  n_layers, n_heads = len(bert.layers), bert.cfg.num_attention_heads
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def example_loss(gates, example):
    one = jax.tree.map(lambda x: x[None], example)
    m = nnx.merge(graphdef, _gated_params(params, gates), rest)
    losses, weights = task.loss(task.forward(m, one), one)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1e-9)

  @jax.jit
  def batch_sums(batch):
    gates = jnp.ones((n_layers, n_heads), jnp.float32)
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(gates, batch)
    real = (batch["weights"] > 0).astype(jnp.float32)
    return (jnp.abs(grads) * real[:, None, None]).sum(0), real.sum()

  total, count = np.zeros((n_layers, n_heads)), 0.0
  for batch in batches:
    s, n = batch_sums(batch)
    total += np.asarray(s, np.float64)
    count += float(n)
  if count == 0:
    raise ValueError("head importance: no examples in the batches")
  return total / count


def normalize(importance: np.ndarray) -> np.ndarray:
  """Each layer's scores divided by their l2 norm (Michel et al., 4.1)."""
  norm = np.linalg.norm(importance, axis=1, keepdims=True)
  return importance / np.maximum(norm, 1e-20)


def choose(importance: np.ndarray, fraction: float) -> dict[int, list[int]]:
  """The `round(fraction * heads)` least important heads over all layers,
  keeping at least one head in every layer: `{layer: [heads]}`.

  Ties are broken by position (layer, then head), so the choice is exact.
  """
  n_layers, n_heads = importance.shape
  total = n_layers * n_heads
  count = int(round(fraction * total))
  if not 0 <= count <= total - n_layers:
    raise ValueError(f"fraction={fraction}: removes {count} of {total} heads; "
                     f"at most {total - n_layers} (one head kept per layer)")
  order = np.argsort(importance.reshape(-1), kind="stable")
  left = [n_heads] * n_layers
  out: dict[int, list[int]] = {}
  for index in order:
    if count == 0:
      break
    layer, head = divmod(int(index), n_heads)
    if left[layer] == 1:
      continue
    out.setdefault(layer, []).append(head)
    left[layer] -= 1
    count -= 1
  return {layer: sorted(heads) for layer, heads in sorted(out.items())}
