"""SMART's smoothness-inducing adversarial regulariser (Jiang et al. 2020).

The loss is the task loss plus `weight` times R, the symmetric divergence
between the model's outputs on the clean batch and on the batch whose word
embeddings (real tokens only, see `research.training.adversarial`) are moved
by a perturbation delta:

    R = mean over examples of KL(p(x) || p(x + delta)) + KL(p(x + delta) || p(x))

(per real token for token classification, since smoothness needs no
label; squared difference for a regression output). R uses no labels: it
asks the output to stay the same near each input, where FGM, PGD and
FreeLB ask the label to.

delta starts as Gaussian noise of std `noise` on the real tokens and takes
`steps` projected ascent steps of size `step_size` on R (the clean output
held constant) inside a per-example ball of radius `epsilon`, as in the
paper's Algorithm 1 (T = 1 step). The update's gradient flows through both
sides of R at the final delta. The paper's Bregman proximal point (a
momentum teacher) is not part of this method.

Cost: one forward pass for the clean target, `steps` forward and backward
passes on delta, then forward passes on the clean and perturbed batch and
one backward through both: about 2.5x a plain step at `steps` = 1.

    config.methods = ("smart",)
    config.method_options = {"smart": {"weight": 1.0, "epsilon": 0.1,
                                       "step_size": 0.1, "steps": 1}}

The scale: the reference implementation (MT-DNN) moves each token's
embedding by 1e-3 in its largest coordinate; a MiniLM word embedding has
coordinates of about 0.05, so over a sentence of 20 words that is an L2
ball of about 0.1, the default here.

Tasks: sequence classification and regression, and token classification
(one logits array per example or token). Deterministic: the noise is drawn
from `fold_in(key, INIT_STREAM)` of the step's key; every pass of a step
uses the same dropout masks.
"""

import jax
import jax.numpy as jnp

from research import methods
from research.configs.plugins import ConfigError
from research.training import adversarial

TASKS = ("sequence_classification", "token_classification")


def divergence(a, b, batch):
  """Weighted mean symmetric divergence between two logits arrays.

  Args:
    a, b: logits [B, C] (C = 1: a regression output) or [B, L, C].
    batch: gives the weights: `weights` per row (0 on a padding row), times
      `attention_mask` for token outputs.

  Returns:
    The scalar mean over the weighted examples (or tokens) of
    KL(p_a || p_b) + KL(p_b || p_a) = sum_c (p_a - p_b)(log p_a - log p_b),
    or of (a - b)^2 for one output.
  """
  if a.shape[-1] == 1:
    per = jnp.square(a - b)[..., 0]
  else:
    la, lb = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
    per = jnp.sum((jnp.exp(la) - jnp.exp(lb)) * (la - lb), axis=-1)
  w = batch["weights"].astype(per.dtype)
  if per.ndim == 2:
    w = w[:, None] * batch["attention_mask"].astype(per.dtype)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


class Method(methods.Method):
  """See the module docstring."""
  # weight: lambda_s; epsilon: radius of each example's ball; step_size: the
  # ascent step (normalised gradient); steps: ascent steps; noise: std of the
  # start; norm: l2 | linf.
  CONFIG = {"weight": 1.0, "epsilon": 0.1, "step_size": 0.1, "steps": 1,
            "noise": 1e-5, "norm": "l2"}

  def __init__(self, config, **options):
    super().__init__(config, **{**self.CONFIG, **options})
    where = "config.method_options.smart"
    adversarial.check_options(self.options, where)
    for name in ("weight", "noise"):
      if self.options[name] < 0:
        raise ConfigError(f"{where}.{name}={self.options[name]!r} must be >= 0")
    if config.task not in TASKS:
      raise ConfigError(
          f"config.methods has 'smart', whose divergence needs one logits "
          f"array per example or token; config.task={config.task!r}; valid: "
          f"{', '.join(TASKS)}")

  def perturbation(self, loss_fn):
    """`(params, frozen, batch, key) -> delta` [B, L, hidden] (no gradient)."""
    hidden, special = adversarial.model_facts(self.config)
    o = self.options

    def perturb(params, frozen, batch, key):
      mask = adversarial.perturbable(batch, special)
      clean = jax.lax.stop_gradient(
          loss_fn(params, frozen, batch, key)[1]["outputs"])
      noise = jax.random.normal(
          jax.random.fold_in(key, adversarial.INIT_STREAM),
          batch["input_ids"].shape + (hidden,)) * o["noise"]
      delta = adversarial.project(noise * mask[..., None], batch, mask,
                                  o["epsilon"], o["norm"])

      def r(d):
        adv = loss_fn(params, frozen, adversarial.with_delta(batch, d), key)
        return divergence(clean, adv[1]["outputs"], batch)

      def step(_, d):
        return adversarial.ascend(d, jax.grad(r)(d), batch, mask,
                                  step_size=o["step_size"],
                                  epsilon=o["epsilon"], norm=o["norm"])

      return jax.lax.stop_gradient(
          jax.lax.fori_loop(0, o["steps"], step, delta))

    return perturb

  def objective(self, loss_fn, delta):
    """The regularised loss at the perturbation `delta`."""
    weight = self.options["weight"]

    def objective(params, frozen, batch, key):
      loss, aux = loss_fn(params, frozen, batch, key)
      _, adv = loss_fn(params, frozen, adversarial.with_delta(batch, delta),
                       key)
      return loss + weight * divergence(aux["outputs"], adv["outputs"],
                                        batch), aux

    return objective

  def grad_fn(self, grad_fn):
    def make(loss_fn):
      perturb = self.perturbation(loss_fn)

      def smart(params, frozen, batch, key):
        delta = perturb(params, frozen, batch, key)
        return grad_fn(self.objective(loss_fn, delta))(params, frozen, batch,
                                                        key)

      return smart

    return make
