"""BitFit: train the bias terms (and the task head) only.

Ben Zaken, Ravfogel and Goldberg (2022), "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models": every weight
matrix of the pre-trained encoder stays frozen; the biases (of the dense
layers and the LayerNorms) and the new task head are trained. The frozen
weights get no optimiser state and are not checkpointed (a run's
checkpoints hold about 0.1% of the encoder's parameters plus the head);
export merges them back from the pre-trained checkpoint.
"""

from research import methods
from research.methods import peft

# head: also train the task head (everything outside the encoder `bert`),
# as the paper does; False: biases only. pooler: also BERT's pooler weights
# (research.methods.peft.is_pooler says when that matters).
CONFIG = {"head": True, "pooler": False}


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = CONFIG

  def setup(self, context):
    peft.check_pooler(self, context)

  def trainable(self):
    saved = peft.saved_modules(self.options)

    def is_trained(path, value):
      return path[-1] == "bias" or saved(path, value)

    return is_trained
