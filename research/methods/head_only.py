"""Linear probing: the task head trains, the whole encoder stays frozen.

Every weight of the encoder `bert` is frozen (no optimiser state, not
checkpointed; export merges it back from the pre-trained checkpoint) and
only the head's weights train (`research.methods.peft.is_head`; `pooler`: BERT's
pooler too). JAX differentiates the trainable part only, so the encoder's
backward pass is never computed: a step costs the encoder's forward and the
head's forward and backward. Uses: a probe of frozen features, and a
masked-LM head for a checkpoint that ships none
(`experiments/mlm_head.py:train=head`: the transform and decoder bias learn
to read the frozen encoder, whose embeddings stay exactly as they were).
"""

from research import methods
from research.methods import peft

CONFIG = {"pooler": False}


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = CONFIG

  def trainable(self):
    return peft.saved_modules({"head": True, **self.options})
