"""SMART's smoothness-inducing adversarial regulariser (Jiang et al. 2020).

The loss is the task loss plus `weight` times R, the symmetric divergence
between the model's outputs on the clean batch and on the batch whose word
embeddings (real tokens only, see `research.methods.adversarial.embeddings`) are moved
by a perturbation delta:

    R = mean over examples of KL(p(x) || p(x + delta)) + KL(p(x + delta) || p(x))

(per weighted example or token of each of the task's output distributions,
`Task.distributions`: one per example for sequence classification, one per
real token for token classification and masked LM, the start and end
distributions of question answering; squared difference for a regression
output). R uses no labels: it
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

Tasks: any whose `Task.distributions` gives its outputs' distributions
(a task without them is refused, naming it). Deterministic: the noise is drawn
from `fold_in(key, INIT_STREAM)` of the step's key; every pass of a step
uses the same dropout masks.
"""

import jax
import jax.numpy as jnp

from research import methods
from research.configs.plugins import ConfigError
from research.methods.adversarial import embeddings as adversarial
from research.tasks import common as task_common

def divergence(a, b, weights):
  """Weighted mean symmetric divergence between two logits arrays.

  Args:
    a, b: logits [..., C] (C = 1: a regression output).
    weights: [...], how much each distribution counts (0 on padding).

  Returns:
    The scalar mean over the weighted distributions of
    KL(p_a || p_b) + KL(p_b || p_a) = sum_c (p_a - p_b)(log p_a - log p_b),
    or of (a - b)^2 for one output.
  """
  if a.shape[-1] == 1:
    per = jnp.square(a - b)[..., 0]
  else:
    la, lb = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
    per = jnp.sum((jnp.exp(la) - jnp.exp(lb)) * (la - lb), axis=-1)
  w = weights.astype(per.dtype)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def total_divergence(task, clean, perturbed, batch):
  """Sum of `divergence` over the task's output distributions."""
  pairs = zip(task.distributions(clean, batch),
              task.distributions(perturbed, batch))
  return sum(divergence(a, b, w) for (a, w), (b, _) in pairs)


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

  def check_task(self, task):
    """SMART compares output distributions: the task must expose them."""
    if type(task).distributions is task_common.Task.distributions:
      raise ConfigError(
          f"config.methods has 'smart', whose divergence compares the "
          f"model's output distributions; config.task={self.config.task!r} "
          "defines no Task.distributions (research/tasks/common.py)")

  def setup(self, context):
    self.task = context.task
    self.hidden, self.special = adversarial.model_facts(context)

  def perturbation(self, loss_fn):
    """`(params, frozen, batch, key) -> delta` [B, L, hidden] (no gradient)."""
    hidden, special, task = self.hidden, self.special, self.task
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
        return total_divergence(task, clean, adv[1]["outputs"], batch)

      def step(_, d):
        return adversarial.ascend(d, jax.grad(r)(d), batch, mask,
                                  step_size=o["step_size"],
                                  epsilon=o["epsilon"], norm=o["norm"])

      return jax.lax.stop_gradient(
          jax.lax.fori_loop(0, o["steps"], step, delta))

    return perturb

  def objective(self, loss_fn, delta):
    """The regularised loss at the perturbation `delta`."""
    weight, task = self.options["weight"], self.task

    def objective(params, frozen, batch, key):
      loss, aux = loss_fn(params, frozen, batch, key)
      _, adv = loss_fn(params, frozen, adversarial.with_delta(batch, delta),
                       key)
      return loss + weight * total_divergence(task, aux["outputs"],
                                              adv["outputs"], batch), aux

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
