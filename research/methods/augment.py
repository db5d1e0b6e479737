"""Text augmentation of the training examples: EDA and contextual replacement.

    config.methods = ("augment",)
    config.method_options.augment = dict(ops=("swap", "delete", "insert"),
                                         copies=1, rate=0.1)

Each training example gets `copies` edited copies (the split grows to
(1 + copies) x N), by `research.data.augment`:

  ops         swap | delete | insert (Wei & Zou's EDA, no thesaurus offline)
              | contextual (Kobayashi 2018: a masked LM's top predictions;
              `mlm_model`: a checkpoint with its MLM head and the training
              vocabulary);
  rate        the share of each text's words edited;
  regenerate  epoch (new copies every epoch, drawn from (seed, epoch): a run
              resumed in epoch e rebuilds exactly that epoch's copies) | once
              (one set before training, as EDA);
  log_examples  originals and copies written to the log.

It changes the training split only (the `training_split` seam); evaluation
sees the original data. Sequence-level tasks (one label per example).
"""

import ml_collections

from research import methods
from research.data import augment
from research.methods.adversarial import embeddings


class Method(methods.Method):
  """See the module docstring."""
  CONFIG = {"ops": ("swap", "delete", "insert"), "copies": 1,
            "regenerate": "epoch", "rate": 0.1, "mlm_model": "",
            "mlm_batch_size": 64, "log_examples": 3}

  def __init__(self, config, **options):
    super().__init__(config, **options)
    self.settings = ml_collections.ConfigDict(options)
    augment.check(self.settings)

  def training_split(self, split, tokenizer):
    return augment.from_options(self.settings, self.config.seed, split,
                                tokenizer, embeddings.special_ids(tokenizer))
