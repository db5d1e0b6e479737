"""Distillation losses, the layer map and the trained projection.

Each loss is a weighted mean over what it compares (examples, tokens, query
positions), so that weights of the same size mean the same everywhere:

  soft_cross_entropy  Hinton et al. (2015): T^2 * CE(softmax(t / T), s / T)
                      per output distribution (`Task.distributions`). At
                      temperature T the soft targets' gradients shrink as
                      1 / T^2; the T^2 keeps the term's size comparable to a
                      hard loss as T changes (Hinton et al., section 2). A
                      regression output (C = 1) has no distribution: its
                      squared difference to the teacher's, unscaled.
                      Cross-entropy, not KL: the two differ by the teacher's
                      entropy, a constant of the student.
  hidden_mse          TinyBERT (Jiao et al. 2020): MSE(H_s W_h, H_t) per
                      mapped layer, the mean over the teacher's features of
                      each real token, W_h a trained projection when the
                      widths differ (`Projection`); layer 0 is the
                      embeddings' output (its own W_e).
  attention_kl        MiniLM (Wang et al. 2020): KL(A_t || A_s) of each
                      head's attention distribution over the keys, per real
                      query token, the mean over heads. TinyBERT matches the
                      unnormalised scores with an MSE instead; the
                      probabilities are what the model exposes
                      (`sow_attention`), and KL is scale-free.

The layer map pairs student layer i with teacher layer g(i) (0: the
embeddings; i = 1 .. L_s the layers' outputs, as Hugging Face's
`hidden_states`); by default TinyBERT's uniform map g(i) = i * L_t / L_s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.configs.plugins import ConfigError

# A student probability below this counts as this in the attention KL's log
# (a float32 softmax can underflow to 0 where the teacher has mass).
TINY = 1e-12


def _weighted_mean(per, weights):
  w = weights.astype(per.dtype)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def soft_cross_entropy(student, teacher, weights, temperature):
  """T^2 x the weighted mean cross-entropy of the teacher's softened targets.

  Args:
    student, teacher: logits [..., C] (C = 1: a regression output, then the
      weighted mean squared difference, with no temperature).
    weights: [...], how much each distribution counts (0 on padding).
    temperature: T > 0.

  Returns:
    A scalar.
  """
  teacher = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  student = student.astype(jnp.float32)
  if student.shape[-1] == 1:
    return _weighted_mean(jnp.square(student - teacher)[..., 0], weights)
  targets = jax.nn.softmax(teacher / temperature, axis=-1)
  log_p = jax.nn.log_softmax(student / temperature, axis=-1)
  # Positions the teacher rules out (a QA task's padding at float32's
  # minimum) have target 0: their term is 0, not 0 x -inf.
  ce = -jnp.sum(jnp.where(targets > 0, targets * log_p, 0.0), axis=-1)
  return temperature ** 2 * _weighted_mean(ce, weights)


def token_weights(batch):
  """[B, L]: 1 on the real tokens of real examples (packed rows included)."""
  mask = batch["attention_mask"].astype(jnp.float32)
  if "segment_ids" in batch:  # packed rows: every row is real
    return mask
  return mask * batch["weights"][:, None]


def hidden_mse(student, teacher, weights):
  """Weighted mean over tokens of the mean squared error over features.

  Args:
    student: [B, L, H_t], the student's hidden states already projected to
      the teacher's width.
    teacher: [B, L, H_t].
    weights: [B, L] (`token_weights`).
  """
  teacher = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  per = jnp.mean(jnp.square(student.astype(jnp.float32) - teacher), axis=-1)
  return _weighted_mean(per, weights)


def attention_kl(student, teacher, weights):
  """Weighted mean over query tokens of KL(teacher || student), mean over heads.

  Args:
    student, teacher: attention probabilities [B, heads, Q, K] (float32,
      `bert.stack_attention`'s per layer).
    weights: [B, Q] (`token_weights`): padding queries count 0.
  """
  t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  log_t = jnp.log(jnp.where(t > 0, t, 1.0))
  log_s = jnp.log(jnp.maximum(student.astype(jnp.float32), TINY))
  kl = jnp.sum(jnp.where(t > 0, t * (log_t - log_s), 0.0), axis=-1)
  return _weighted_mean(jnp.mean(kl, axis=1), weights)


# --- Layers ------------------------------------------------------------------------


def uniform_map(student_layers: int, teacher_layers: int) -> dict:
  """TinyBERT's g(i) = i * L_t / L_s (rounded), with 0 -> 0 (embeddings)."""
  return {i: round(i * teacher_layers / student_layers)
          for i in range(student_layers + 1)}


def parse_layer_map(text: str, student_layers: int, teacher_layers: int,
                    where: str) -> dict:
  """"0:0,1:2,2:4,3:6" -> {student layer: teacher layer}; "" -> uniform.

  Raises:
    ConfigError: a malformed pair or a layer the model does not have.
  """
  if not text.strip():
    return uniform_map(student_layers, teacher_layers)
  out = {}
  for pair in text.split(","):
    s, sep, t = pair.strip().partition(":")
    if not sep or not s.strip().isdigit() or not t.strip().isdigit():
      raise ConfigError(f"{where}={text!r}: expected student:teacher layer "
                        f"pairs such as '0:0,1:2,2:4,3:6', got {pair!r}")
    s, t = int(s), int(t)
    if s > student_layers or t > teacher_layers:
      raise ConfigError(
          f"{where}={text!r}: pair {s}:{t} names a layer past the student's "
          f"{student_layers} or the teacher's {teacher_layers} (0 is the "
          "embeddings)")
    if s in out:
      raise ConfigError(f"{where}={text!r}: student layer {s} is mapped twice")
    out[s] = t
  return dict(sorted(out.items()))


def parse_layers(text: str, layer_map: dict, where: str) -> tuple:
  """Student layers of the attention loss: "last", "all" or "1,3".

  Raises:
    ConfigError: a layer outside the map's student layers >= 1.
  """
  mapped = [i for i in layer_map if i > 0]
  if text == "last":
    return tuple(mapped[-1:])
  if text == "all":
    return tuple(mapped)
  try:
    layers = tuple(int(x) for x in text.split(","))
  except ValueError:
    layers = None
  if not layers or any(i not in mapped for i in layers):
    raise ConfigError(f"{where}={text!r}: 'last', 'all' or student layers "
                      f"of the layer map, comma-separated (mapped: "
                      f"{', '.join(map(str, mapped))})")
  return layers


def hidden_states(sown) -> list:
  """[embeddings' output, layer 1's, ...] from a capture of the encoder's
  method outputs (`nnx.capture(..., method_outputs=nnx.Intermediate)`)."""
  found = {}
  for path, value in nnx.to_flat_state(sown):
    if path[-1] != "__call__" or "bert" not in path:
      continue
    rest = path[path.index("bert") + 1:-1]
    if rest == ("embeddings",):
      found[0] = value.get_value()[0]
    elif len(rest) == 2 and rest[0] == "layers":
      found[int(rest[1]) + 1] = value.get_value()[0]
  if not found:
    raise ValueError("no hidden states were captured: call the model inside "
                     "nnx.capture(..., method_outputs=nnx.Intermediate)")
  return [found[i] for i in sorted(found)]


class ProjectionParam(nnx.Param):
  """A weight of the distillation projection (trained, never exported)."""


class _Linear(nnx.Module):
  """x @ kernel + bias, its weights `ProjectionParam`s."""

  def __init__(self, n_in, n_out, *, param_dtype, rngs):
    init = nnx.initializers.normal(0.02)
    self.kernel = ProjectionParam(
        init(rngs.params(), (n_in, n_out), param_dtype),
        out_sharding=("embed", None), eager_sharding=False)
    self.bias = ProjectionParam(jnp.zeros((n_out,), param_dtype),
                                out_sharding=(None,), eager_sharding=False)

  def __call__(self, x):
    return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class Projection(nnx.Module):
  """TinyBERT's W_h (the layers) and W_e (the embeddings): student width ->
  teacher width, trained with the student and dropped on export."""

  def __init__(self, student: int, teacher: int, *, embeddings: bool,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.hidden = _Linear(student, teacher, **kw)
    self.embeddings = _Linear(student, teacher, **kw) if embeddings else None

  def __call__(self, x, layer: int):
    """Layer `layer`'s hidden states [..., student] -> [..., teacher]."""
    return (self.embeddings if layer == 0 and self.embeddings is not None
            else self.hidden)(x)
