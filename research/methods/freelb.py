"""FreeLB: free large-batch adversarial training (Zhu et al. 2020).

`steps` (K) ascent steps on a perturbation of the word embeddings (real
tokens only, see `research.methods.adversarial.embeddings`), starting from uniform
noise of size `init_magnitude` inside the epsilon ball. Every step's
forward and backward pass gives the parameter gradient at the current
perturbation, which is accumulated, and the ascent direction; the update
uses the mean of the K parameter gradients (and the reported loss is the
mean of the K losses). K forward and backward passes per step.

`epsilon` is the ball's radius (per example, L2 or L-infinity); 0 keeps the
perturbation at zero, so one step with epsilon 0 is plain training.

    config.methods = ("freelb",)
    config.method_options = {"freelb": {"epsilon": 0.3, "step_size": 0.1,
                                       "steps": 2}}

Deterministic: the noise is drawn from `fold_in(key, INIT_STREAM)` of the
step's key (a function of seed and step); the dropout masks are the same in
every ascent step of a step, as in the paper.
"""

import jax

from research import methods
from research.methods.adversarial import embeddings as adversarial


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = {"epsilon": 0.3, "step_size": 0.1, "steps": 2, "norm": "l2",
            "init_magnitude": 0.1}

  def __init__(self, config, **options):
    super().__init__(config, **{**self.CONFIG, **options})
    adversarial.check_options(self.options, "config.method_options.freelb")

  def setup(self, context):
    # The embedding width and the tokens never perturbed, from the run.
    self.hidden, self.special = adversarial.model_facts(context)

  def grad_fn(self, grad_fn):
    hidden, special = self.hidden, self.special
    o = self.options
    steps = o["steps"]

    def make(loss_fn):
      joint = grad_fn(adversarial.joint(loss_fn))

      def value_and_grads(params, frozen, batch, key):
        mask = adversarial.perturbable(batch, special)
        delta = adversarial.random_init(
            jax.random.fold_in(key, adversarial.INIT_STREAM), batch, mask,
            hidden, magnitude=o["init_magnitude"], epsilon=o["epsilon"],
            norm=o["norm"])

        def ascent(delta):
          (loss, aux), (grads, g) = joint((params, delta), frozen, batch, key)
          delta = adversarial.ascend(
              delta, g, batch, mask, step_size=o["step_size"],
              epsilon=o["epsilon"], norm=o["norm"])
          return jax.lax.stop_gradient(delta), loss, aux, grads

        # The first step outside the loop gives the carry's structure.
        delta, loss, aux, grads = ascent(delta)

        def body(_, carry):
          delta, loss_sum, grad_sum = carry
          delta, loss, _, grads = ascent(delta)
          return delta, loss_sum + loss, jax.tree.map(
              lambda a, b: a + b, grad_sum, grads)

        _, loss, grads = jax.lax.fori_loop(0, steps - 1, body,
                                           (delta, loss, grads))
        return (loss / steps, aux), jax.tree.map(lambda x: x / steps, grads)

      return value_and_grads

    return make
