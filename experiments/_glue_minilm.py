"""CoLA, RTE and MR on the packaged MiniLM: what peft.py, robust.py and dp_sgd.py share.

Not an experiment (no get_config). BERT's GLUE recipe (batch 32, 3 epochs,
AdamW with weight decay 0.01, 10% warm-up then linear decay) on
all-MiniLM-L6-v2 at the learning rate chosen on dev for full fine-tuning
(1e-4 on CoLA and RTE; MR takes the same, not chosen on it). Data: TFDS
`glue/<task>` by default (downloaded on first use), or with `data_dir` a
folder holding the task's `train.tsv` and `dev.tsv` (e.g.
`data_dir=../shared/data/glue_cola`). MR (SentEval's movie-review polarity,
Pang and Lee 2005; a `label` and a `sentence` column) has no TFDS set here:
it needs `data_dir` (e.g. ../shared/data/senteval_mr).
"""

import os

from research.configs import default
from research.configs.plugins import ConfigError

# task -> (text fields, metrics; the first selects checkpoints).
TASKS = {
    "cola": (("sentence",), ("matthews_corrcoef", "accuracy")),
    "rte": (("sentence1", "sentence2"), ("accuracy",)),
    "mr": (("sentence",), ("accuracy",)),
}
TRAIN_ROWS = {"cola": 8551, "rte": 2490, "mr": 8529}
LOCAL_ONLY = ("mr",)  # no TFDS data set: data_dir is required


def get_config(task, data_dir="", max_length=128):
  """The recipe for `task` ("cola" or "rte") on TFDS or `data_dir`'s TSVs."""
  fields, metrics = TASKS[task]
  if task in LOCAL_ONLY and not data_dir:
    raise ConfigError(
        f"task {task!r} has no TFDS data set: give data_dir=, a folder with "
        "its train.tsv and dev.tsv (e.g. data_dir=../shared/data/senteval_mr)")
  config = default.get_config()
  config.model.name = "all-minilm-l6-v2"
  if data_dir:
    config.data.source = "local"
    config.data.train_file = os.path.join(data_dir, "train.tsv")
    config.data.eval_file = os.path.join(data_dir, "dev.tsv")
  else:
    config.data.source = "tfds"
    config.data.name = f"glue/{task}"
  config.data.text_fields = fields
  config.data.label_field = "label"
  config.data.max_length = max_length
  config.metrics = metrics
  config.eval_metric = metrics[0]
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 3.0
  config.optimizer.learning_rate = 1e-4  # a small model; chosen on dev
  config.optimizer.weight_decay = 0.01
  config.optimizer.warmup_proportion = 0.1
  config.log_every_steps = 50
  config.keep_checkpoints = 1
  return config
