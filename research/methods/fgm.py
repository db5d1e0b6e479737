"""FGM: adversarial training with one normalised-gradient step (Miyato et al. 2017).

The perturbation of each example's word embeddings (real tokens only) is
`epsilon * g / ||g||`, with `g` the gradient of the loss with respect to
those embeddings and the norm over the example's tokens and hidden units
(`norm="linf"`: `epsilon * sign(g)`, FGSM). The loss is clean +
adversarial. PGD with one step of size epsilon (`research/methods/pgd.py`);
two forward and backward passes per step.

    config.methods = ("fgm",)
    config.method_options = {"fgm": {"epsilon": 0.3}}
"""

from research.methods import pgd


class Method(pgd.Method):
  """See the module docstring."""
  CONFIG = {"epsilon": 0.3, "norm": "l2"}

  def attack(self):
    return 1, self.options["epsilon"], self.options["epsilon"], \
        self.options["norm"]
