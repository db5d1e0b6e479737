"""Token attributions for a sequence classifier (or regressor).

The function explained is f(e) = one output of a `SequenceClassification`
model (a class logit, or the regression value when `num_labels == 1`) as a
function of the word embeddings e [t, hidden] of one example, in evaluation
mode. Position and token-type embeddings and the attention mask stay fixed,
so a token's attribution is what its word contributes.

- `gradient_x_input`: sum over the embedding of e * df/de (one backward pass).
- `integrated_gradients` (Sundararajan et al., 2017): sum over the embedding
  of (e - e') * the mean of df/de along the straight path from a baseline e'
  to e, by the trapezoid rule with `steps` intervals; the path points are
  batched with `jax.vmap`. Its attributions add up to f(e) - f(e')
  ("completeness"), which `completeness` checks.

Padding (attention_mask 0) cannot reach any real token: its attention
probability is exactly zero, so its attribution is exactly zero too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.interpret.forward import Inputs, encoder_of, word_embeddings
from research.models.heads import SequenceClassification

BASELINES = ("pad", "zero", "mask")


@dataclasses.dataclass(frozen=True)
class Attribution:
  """Per-token attributions of one example.

  Attributes:
    tokens: the t token strings.
    scores: float32 [t], one score per token (summed over the embedding);
      positive pushes the target output up.
    attention_mask: int32 [t], 1 = real token.
    method: "integrated_gradients" or "gradient_x_input".
    target: the explained output index (class id; 0 for regression).
    output: f(input), the explained logit / regression value.
    baseline_output: f(baseline); for gradient x input the baseline is zero
      embeddings (it is integrated gradients from zero with one step).
    baseline: the baseline's name ("pad", "zero", "mask", "token <id>" or
      "custom").
    steps: integration intervals (1 for gradient x input).
  """
  tokens: tuple[str, ...]
  scores: np.ndarray
  attention_mask: np.ndarray
  method: str
  target: int
  output: float
  baseline_output: float
  baseline: str
  steps: int


@dataclasses.dataclass(frozen=True)
class Completeness:
  """How well attributions add up to f(input) - f(baseline).

  Attributes:
    total: the sum of the attributions.
    expected: f(input) - f(baseline).
    error: |total - expected|.
    relative_error: error / |expected| (inf when expected is 0 and error > 0).
    ok: error <= atol + rtol * |expected|.
  """
  total: float
  expected: float
  error: float
  relative_error: float
  ok: bool


def completeness(attribution: Attribution, rtol: float = 1e-2,
                 atol: float = 1e-5) -> Completeness:
  """Checks sum(attributions) == f(input) - f(baseline) within tolerance.

  Integrated gradients satisfy it up to the integration error (more `steps`
  -> smaller); gradient x input generally does not, which is a reason to
  prefer integrated gradients.

  Args:
    attribution: from `integrated_gradients` or `gradient_x_input`.
    rtol: tolerance relative to |f(input) - f(baseline)|.
    atol: absolute tolerance (for outputs that barely move).

  Returns:
    A `Completeness`; `.ok` says whether it holds.
  """
  total = float(np.sum(attribution.scores, dtype=np.float64))
  expected = attribution.output - attribution.baseline_output
  error = abs(total - expected)
  relative = error / abs(expected) if expected else (np.inf if error else 0.0)
  return Completeness(total, expected, error, relative,
                      bool(error <= atol + rtol * abs(expected)))


def baseline_embeddings(model: nnx.Module, inputs: Inputs,
                        baseline="pad") -> tuple[jax.Array, str]:
  """The baseline word embeddings [t, hidden] and their name.

  Args:
    model: the model (its word embeddings give the token baselines).
    inputs: the example (its length; its [MASK] id for "mask").
    baseline: "pad" (every position the [PAD] embedding), "zero" (zero
      embeddings), "mask" (every position [MASK]), an int token id, or an
      array [t, hidden] of embeddings.
  """
  t = len(inputs.input_ids)
  if isinstance(baseline, str):
    if baseline == "zero":
      hidden = encoder_of(model).cfg.hidden_size
      return jnp.zeros((t, hidden), jnp.float32), "zero"
    if baseline == "pad":
      token = encoder_of(model).cfg.pad_token_id
    elif baseline == "mask":
      if inputs.mask_token_id is None:
        raise ValueError("baseline='mask' needs inputs.mask_token_id (set by "
                         "encode from the tokenizer); or pass the id as an int")
      token = inputs.mask_token_id
    else:
      raise ValueError(f"baseline={baseline!r}; valid: {', '.join(BASELINES)}, "
                       "a token id, or an array [t, hidden]")
    return word_embeddings(model, jnp.full((t,), token, jnp.int32)), baseline
  if isinstance(baseline, (int, np.integer)):
    return (word_embeddings(model, jnp.full((t,), baseline, jnp.int32)),
            f"token {int(baseline)}")
  emb = jnp.asarray(baseline, jnp.float32)
  hidden = encoder_of(model).cfg.hidden_size
  if emb.shape != (t, hidden):
    raise ValueError(f"a baseline array must be [t, hidden] = {(t, hidden)}, "
                     f"got {emb.shape}")
  return emb, "custom"


def _output(model, embeds, attention_mask, token_type_ids, target):
  """f: word embeddings [t, hidden] of one example -> the target output []."""
  logits = model(None, attention_mask[None], token_type_ids[None],
                 inputs_embeds=embeds[None])  # [1, num_labels]
  return logits[0, target]


@nnx.jit
def _logits(model, input_ids, attention_mask, token_type_ids):
  return model(input_ids, attention_mask, token_type_ids)


@nnx.jit
def _gradient_x_input(model, x, zero, attention_mask, token_type_ids, target):
  f = functools.partial(_output, model, attention_mask=attention_mask,
                        token_type_ids=token_type_ids, target=target)
  scores = (x * jax.grad(f)(x)).sum(-1)  # [t]
  return scores, f(x), f(zero)


@functools.partial(nnx.jit, static_argnames=("batch_size",))
def _integrated_gradients(model, x, baseline, attention_mask, token_type_ids,
                          target, alphas, weights, batch_size):
  """Scores [t], f(x), f(baseline); alphas/weights [n * batch_size]."""
  f = functools.partial(_output, model, attention_mask=attention_mask,
                        token_type_ids=token_type_ids, target=target)
  grad_f = jax.grad(f)

  def weighted_grad_sum(chunk):
    a, w = chunk  # [batch_size] each
    path = baseline + a[:, None, None] * (x - baseline)  # [batch_size, t, hidden]
    return jnp.tensordot(w, jax.vmap(grad_f)(path), axes=1)  # [t, hidden]

  chunks = (alphas.reshape(-1, batch_size), weights.reshape(-1, batch_size))
  # lax.map over chunks bounds memory to batch_size path points at a time.
  mean_grad = jax.lax.map(weighted_grad_sum, chunks).sum(0)  # [t, hidden]
  return ((x - baseline) * mean_grad).sum(-1), f(x), f(baseline)


def _check_model(model) -> None:
  if not isinstance(model, SequenceClassification):
    raise TypeError(f"attributions explain a SequenceClassification output; "
                    f"got {type(model).__name__}")


def _resolve_target(model, inputs: Inputs, target) -> int:
  if model.num_labels == 1:
    if target not in (None, 0):
      raise ValueError(f"a regression model has one output; target={target}")
    return 0
  if target is None:  # the predicted class
    return int(jnp.argmax(_logits(model, *inputs.batch)[0]))
  if not 0 <= int(target) < model.num_labels:
    raise ValueError(f"target={target}; the model has {model.num_labels} classes")
  return int(target)


def gradient_x_input(model: nnx.Module, inputs: Inputs,
                     target: int | None = None) -> Attribution:
  """Gradient x input: per token, sum over the embedding of e * df/de.

  Args:
    model: a `SequenceClassification` model (evaluation mode is used).
    inputs: one example (`research.interpret.encode`).
    target: the class whose logit is explained (default: the predicted
      class); ignored for regression (one output).

  Returns:
    An `Attribution` (baseline "zero", steps 1).
  """
  _check_model(model)
  target = _resolve_target(model, inputs, target)
  x = word_embeddings(model, inputs.input_ids)
  zero = jnp.zeros_like(x)
  scores, out, base = _gradient_x_input(
      model, x, zero, jnp.asarray(inputs.attention_mask),
      jnp.asarray(inputs.token_type_ids), target)
  return Attribution(inputs.tokens, np.asarray(scores, np.float32),
                     inputs.attention_mask, "gradient_x_input", target,
                     float(out), float(base), "zero", 1)


def integrated_gradients(model: nnx.Module, inputs: Inputs,
                         target: int | None = None, *, baseline="pad",
                         steps: int = 50,
                         batch_size: int | None = None) -> Attribution:
  """Integrated gradients from a baseline to the example's embeddings.

  Args:
    model: a `SequenceClassification` model (evaluation mode is used).
    inputs: one example (`research.interpret.encode`).
    target: the class whose logit is explained (default: the predicted
      class); ignored for regression (one output).
    baseline: "pad", "zero", "mask", a token id or an array [t, hidden]; see
      `baseline_embeddings`.
    steps: trapezoid intervals along the path (steps + 1 gradient
      evaluations); the completeness error shrinks as 1 / steps**2.
    batch_size: path points per `jax.vmap` batch (default: all at once);
      smaller bounds memory for long inputs or big models.

  Returns:
    An `Attribution`; `completeness(result)` checks that it adds up.
  """
  _check_model(model)
  if steps < 1:
    raise ValueError(f"steps={steps}; need at least 1")
  target = _resolve_target(model, inputs, target)
  x = word_embeddings(model, inputs.input_ids)  # [t, hidden]
  base, name = baseline_embeddings(model, inputs, baseline)
  # Trapezoid rule on [0, 1]: steps + 1 points, end points weighted 1/2.
  alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
  weights = np.full(steps + 1, 1.0 / steps, np.float32)
  weights[[0, -1]] /= 2
  batch_size = min(batch_size or steps + 1, steps + 1)
  pad = -(steps + 1) % batch_size  # extra points with weight 0
  alphas = np.pad(alphas, (0, pad))
  weights = np.pad(weights, (0, pad))
  scores, out, base_out = _integrated_gradients(
      model, x, base.astype(x.dtype), jnp.asarray(inputs.attention_mask),
      jnp.asarray(inputs.token_type_ids), target, alphas, weights, batch_size)
  return Attribution(inputs.tokens, np.asarray(scores, np.float32),
                     inputs.attention_mask, "integrated_gradients", target,
                     float(out), float(base_out), name, steps)
