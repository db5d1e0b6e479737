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

# head: also train the task head (everything outside the encoder `bert`),
# as the paper does; False: biases only.
CONFIG = {"head": True}


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = CONFIG

  def trainable(self):
    train_head = self.options["head"]

    def is_trained(path, value):
      del value
      return path[-1] == "bias" or (train_head and path[0] != "bert")

    return is_trained
