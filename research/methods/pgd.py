"""PGD adversarial training on the word embeddings (Madry et al. 2018).

Each step trains on the clean batch and on the batch whose word embeddings
(real tokens only, see `research.methods.adversarial.embeddings`) are moved by the
perturbation found with `steps` projected ascent steps of size `step_size`
inside a per-example ball of radius `epsilon` (L2 or L-infinity), starting
from zero. The loss is clean + adversarial, as in Miyato et al. (2017) and
the usual BERT recipes; the perturbation is a constant for the parameter
gradient (no second-order term).

Cost: `steps + 1` forward and backward passes per step. The clean pass gives
the parameter gradient and the first ascent direction together (one
backward); each further ascent step needs the embedding gradient only.

    config.methods = ("pgd",)
    config.method_options = {"pgd": {"epsilon": 0.3, "step_size": 0.15,
                                    "steps": 3}}

Deterministic: no randomness beyond the dropout key of the step (the same
masks in every pass of a step, as FreeLB keeps them).
"""

import jax

from research import methods
from research.methods.adversarial import embeddings as adversarial
from research.training import steps


class Method(methods.Method):
  """See the module docstring."""
  # epsilon: radius of each example's ball; step_size: length of an ascent
  # step (normalised gradient); steps: ascent steps; norm: l2 | linf.
  CONFIG = {"epsilon": 0.3, "step_size": 0.15, "steps": 3, "norm": "l2"}

  def __init__(self, config, **options):
    super().__init__(config, **{**self.CONFIG, **options})
    adversarial.check_options(self.options, self.where)

  def setup(self, context):
    # The embedding width and the tokens never perturbed, from the run.
    self.hidden, self.special = adversarial.model_facts(context)

  @property
  def where(self):
    return f"config.method_options.{type(self).__module__.rsplit('.', 1)[-1]}"

  def attack(self):
    """(steps, step_size, epsilon, norm) of the ascent."""
    o = self.options
    return o["steps"], o["step_size"], o["epsilon"], o["norm"]

  def perturbation(self, loss_fn, grad_fn=steps.value_and_grad):
    """`(params, frozen, batch, key) -> (delta, ((loss, aux), grads))`.

    The perturbation [B, L, hidden] of the batch's word embeddings, with the
    clean pass's loss and parameter gradients (computed together with the
    first ascent direction).
    """
    hidden, special = self.hidden, self.special
    num_steps, step_size, epsilon, norm = self.attack()
    joint = grad_fn(adversarial.joint(loss_fn))

    def perturb(params, frozen, batch, key):
      mask = adversarial.perturbable(batch, special)
      zero = adversarial.zeros(batch, hidden)
      (loss, aux), (grads, g) = joint((params, zero), frozen, batch, key)
      delta = adversarial.pgd(
          lambda d: loss_fn(params, frozen, adversarial.with_delta(batch, d),
                            key)[0],
          g, batch, mask, steps=num_steps, step_size=step_size,
          epsilon=epsilon, norm=norm)
      return jax.lax.stop_gradient(delta), ((loss, aux), grads)

    return perturb

  def grad_fn(self, grad_fn):
    def make(loss_fn):
      perturb = self.perturbation(loss_fn, grad_fn)
      adv = grad_fn(loss_fn)

      def value_and_grads(params, frozen, batch, key):
        delta, ((loss, aux), grads) = perturb(params, frozen, batch, key)
        (adv_loss, _), adv_grads = adv(
            params, frozen, adversarial.with_delta(batch, delta), key)
        return (loss + adv_loss, aux), jax.tree.map(
            lambda a, b: a + b, grads, adv_grads)

      return value_and_grads

    return make
