r"""Quickstart: fine-tune the packaged all-MiniLM-L6-v2 on the shipped review set.

Runs offline on CPU in a few minutes (320 training sentences, 100 dev; see
data/quickstart/README.md; a smoke-test set, not a benchmark):

    python -m research.train --config experiments/quickstart.py \
        --workdir /tmp/quickstart

Expected result: eval/accuracy 0.89 after 3 epochs on 2 CPU cores (dev majority class:
0.50). `--config experiments/quickstart.py:smoke` runs a 12-step version.

Any TSV with `sentence` and `label` columns works by overrides alone:

    python -m research.train --config experiments/quickstart.py \
        --config.data.train_file=my/train.tsv --config.data.eval_file=my/dev.tsv \
        --config.data.text_fields="('review',)" --config.data.label_field=stars \
        --config.num_labels=5 --config.data.max_length=256 --config.batch_size=16 \
        --config.num_epochs=5 --config.optimizer.learning_rate=3e-5 \
        --workdir /tmp/my_run
"""

import os

from research.configs import default
from research.configs.args import parse_arg

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data",
                    "quickstart")


def get_config(arg=None):
  """`arg`: empty for the full run, "smoke" for a 12-step check."""
  args = parse_arg(arg, {"smoke": False}, "experiments/quickstart.py")
  config = default.get_config()
  config.model.name = "all-minilm-l6-v2"
  config.task = "sequence_classification"
  config.num_labels = 2
  config.data.source = "local"
  config.data.train_file = os.path.normpath(os.path.join(DATA, "train.tsv"))
  config.data.eval_file = os.path.normpath(os.path.join(DATA, "dev.tsv"))
  config.data.text_fields = ("sentence",)
  config.data.label_field = "label"
  config.data.label_names = ("negative", "positive")
  config.data.max_length = 64
  # The sentences are 5-50 tokens; these lengths pad only 12% (BENCHMARKS.md).
  config.data.buckets = (14, 17, 20, 45)
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 3.0
  config.optimizer.learning_rate = 2e-4   # a small model on a small set
  config.metrics = ("accuracy", "f1")
  config.eval_metric = "accuracy"
  config.log_every_steps = 5
  config.wandb.project = "research-bert-quickstart"
  if args.smoke:
    config.total_steps = 12
    config.eval_every_steps = 6
  return config
