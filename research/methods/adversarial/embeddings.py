"""Embedding-space perturbations: the core of FGM, PGD, FreeLB and the attack evaluator.

A perturbation `delta` [batch, length, hidden] travels in the batch as
`batch["embeds_delta"]`; `Task.forward` adds it to the word embeddings
(through the model's `inputs_embeds` hook), before the position and
token-type embeddings, LayerNorm and dropout, as Miyato et al. (2017) and
FreeLB (Zhu et al. 2020) perturb BERT. Everything here keeps `delta` zero
where `perturbable` is 0 (padding and special tokens: [CLS], [SEP], [PAD],
[MASK]), so only the words of each example move.

Norms are per example: the L2 norm of an example's `delta` over all its
real tokens and hidden units (FreeLB's `delta.view(B, -1).norm(dim=1)`), or
the element-wise L-infinity norm. In packed rows (`segment_ids`) each
example of a row has its own norm.

Steps (`ascend`): `delta + step_size * normalize(g)`, with `normalize` the
per-example L2-normalised gradient (or its sign for L-infinity), then the
projection onto the epsilon ball. FGM is one such step with step_size =
epsilon from zero; PGD several; FreeLB several with the parameter gradients
of every step accumulated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from research.configs.plugins import ConfigError

DELTA = "embeds_delta"
NORMS = ("l2", "linf")
# The key stream of random initialisations, apart from dropout's draws
# (`nnx.Rngs(dropout=key)` folds in 0, 1, ...) and the transform's.
INIT_STREAM = 0x7FFFFFFD
_TINY = 1e-12


def check_options(options, where) -> None:
  """Raises ConfigError for a bad epsilon, step size, step count or norm."""
  if options.get("norm", "l2") not in NORMS:
    raise ConfigError(f"{where}.norm={options['norm']!r}; valid: "
                      f"{', '.join(NORMS)}")
  for name in ("epsilon", "step_size", "init_magnitude"):
    if name in options and options[name] < 0:
      raise ConfigError(f"{where}.{name}={options[name]!r} must be >= 0")
  if "steps" in options and options["steps"] < 1:
    raise ConfigError(f"{where}.steps={options['steps']!r} must be >= 1")


def model_facts(context):
  """(hidden size, special token ids) of a run (`methods.Context`): what an
  embedding perturbation needs, from what the run already holds."""
  return context.model_cfg.hidden_size, special_ids(context.tokenizer)


def special_ids(tokenizer) -> tuple:
  """The ids never perturbed: every special token but [UNK] (a real word)."""
  unk = tokenizer.unk_token_id
  return tuple(sorted(int(i) for i in tokenizer.all_special_ids if i != unk))


def perturbable(batch, special) -> jax.Array:
  """float [B, L]: 1 at the real, non-special tokens of the batch."""
  ids = batch["input_ids"]
  keep = batch["attention_mask"].astype(bool)
  if special:
    keep &= ~jnp.isin(ids, jnp.asarray(special, ids.dtype))
  return keep.astype(jnp.float32)


def zeros(batch, hidden) -> jax.Array:
  """A zero perturbation [B, L, hidden] of the batch."""
  return jnp.zeros(batch["input_ids"].shape + (hidden,), jnp.float32)


def with_delta(batch, delta) -> dict:
  """The batch with `delta` added to its word embeddings by the task."""
  return {**batch, DELTA: delta}


def joint(loss_fn):
  """`loss_fn` of `((params, delta), frozen, batch, key)`: one gradient
  function call gives the parameter gradient and the ascent direction."""
  return lambda pd, frozen, batch, key: loss_fn(
      pd[0], frozen, with_delta(batch, pd[1]), key)


def _example_sum(x, batch) -> jax.Array:
  """x [B, L] -> [B, L]: at each token, the sum of x over its example."""
  if "segment_ids" in batch:  # packed rows: example k of a row is segment k
    groups = batch["segment_ids"]
    count = batch["example_starts"].shape[1] + 1
  else:
    groups = batch["attention_mask"].astype(jnp.int32)
    count = 2
  onehot = jax.nn.one_hot(groups, count, dtype=x.dtype)  # [B, L, G]
  sums = jnp.einsum("blg,bl->bg", onehot, x)
  return jnp.einsum("blg,bg->bl", onehot, sums)


def example_norm(delta, batch, mask) -> jax.Array:
  """[B, L, 1]: the L2 norm of each token's example's masked `delta`."""
  sq = jnp.sum(jnp.square(delta), axis=-1) * mask
  return jnp.sqrt(_example_sum(sq, batch))[..., None]


def normalize(g, batch, mask, norm) -> jax.Array:
  """The ascent direction: g / ||g|| per example (L2) or sign(g) (L-inf)."""
  m = mask[..., None]
  if norm == "linf":
    return jnp.sign(g) * m
  return g * m / jnp.maximum(example_norm(g, batch, mask), _TINY)


def project(delta, batch, mask, epsilon, norm) -> jax.Array:
  """`delta` moved into the epsilon ball of each example (zero off `mask`)."""
  m = mask[..., None]
  if norm == "linf":
    return jnp.clip(delta, -epsilon, epsilon) * m
  scale = jnp.minimum(
      1.0, epsilon / jnp.maximum(example_norm(delta, batch, mask), _TINY))
  return delta * scale * m


def ascend(delta, g, batch, mask, *, step_size, epsilon, norm) -> jax.Array:
  """One projected ascent step along the normalised gradient `g`."""
  return project(delta + step_size * normalize(g, batch, mask, norm), batch,
                 mask, epsilon, norm)


def random_init(key, batch, mask, hidden, *, magnitude, epsilon, norm):
  """FreeLB's start: uniform noise on the real tokens, in the epsilon ball.

  L2: U(-1, 1) scaled by magnitude / sqrt(real tokens x hidden) per example
  (so its norm is about magnitude / sqrt(3)); L-inf: U(-magnitude, magnitude).
  """
  u = jax.random.uniform(key, batch["input_ids"].shape + (hidden,),
                         jnp.float32, -1.0, 1.0) * mask[..., None]
  if norm == "l2":
    dims = jnp.maximum(_example_sum(mask, batch) * hidden, 1.0)[..., None]
    u = u * magnitude / jnp.sqrt(dims)
  else:
    u = u * magnitude
  return project(u, batch, mask, epsilon, norm)


def pgd(loss_of_delta, g, batch, mask, *, steps, step_size, epsilon, norm):
  """`steps` projected ascent steps from zero; `g` the gradient at zero.

  Args:
    loss_of_delta: `delta -> scalar loss` (parameters held fixed).
    g: its gradient at delta = 0 (the clean pass gives it for free).
    batch, mask: the batch and its `perturbable` mask.
    steps, step_size, epsilon, norm: the attack.

  Returns:
    The perturbation [B, L, hidden] after `steps` steps (one gradient per
    step: the clean one and `steps - 1` more).
  """
  step = functools.partial(ascend, batch=batch, mask=mask, step_size=step_size,
                           epsilon=epsilon, norm=norm)
  delta = step(jnp.zeros_like(g), g)
  grad = jax.grad(loss_of_delta)
  return jax.lax.fori_loop(0, steps - 1, lambda _, d: step(d, grad(d)), delta)

