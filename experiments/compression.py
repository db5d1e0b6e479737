r"""Compression of a fine-tuned MiniLM: the training-time rows of the table.

One run of the packaged all-MiniLM-L6-v2 per (data, method, sparsity, seed):

    python -m research.train \
        --config experiments/compression.py:data=mr,method=magnitude,sparsity=0.9,seed=0 \
        --workdir /tmp/compression/mr/magnitude0.9/0

`arg` (key=value, comma-separated):
  data=quickstart (default) | mr | rte | cola: the shipped review set (its
    recipe: batch 16, 3 epochs, lr 2e-4, 64 tokens), SentEval MR
    (../shared/data/senteval_mr) or GLUE RTE / CoLA (../shared/data/glue_*),
    these three with BERT's recipe at the rate chosen on dev for this MiniLM
    (3 epochs of batch 32, lr 1e-4, warmup 10%, decay 0.01; 64 tokens, RTE
    128);
  method=plain (default: the fp32 teacher) | qat (int8 quantisation-aware
    training, `research/methods/qat.py`) | magnitude (Zhu & Gupta) |
    movement (Sanh et al.);
  sparsity=0.5 (default) | any fraction in [0, 1): the pruning methods';
  seed=N.

Pruning: the cubic schedule from 10% to 70% of the updates, masks every 10
updates (movement pruning's paper recomputes every update; a recomputation
costs ~1 s on 2 CPU cores for MiniLM's 10.6M weights), then 30% of the run
at the final sparsity. Every run evaluates once, after its last step (the
metrics of the last step; no checkpoint chosen on dev).

The post-training rows (int8 PTQ, weight-only int8, 50% of heads removed)
take the plain runs' checkpoints (`research.compress`); the table is
`benchmarks/compression.py`. Results: not measured yet.
"""

import os

from experiments import quickstart
from research.configs import default

SHARED = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))

DATA = ("quickstart", "mr", "rte", "cola")
METHODS = ("plain", "qat", "magnitude", "movement")
# Pruning's schedule (fractions of the run's updates) and mask period.
SCHEDULE = {"begin": 0.1, "end": 0.7, "frequency": 10}


def _parse(arg):
  values = {"data": "quickstart", "method": "plain", "sparsity": "0.5",
            "seed": "0"}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep or key not in values:
      raise ValueError(f"experiments/compression.py:{arg}: {item!r}; valid "
                       "keys: data=, method=, sparsity=, seed=")
    values[key] = value
  for key, valid in (("data", DATA), ("method", METHODS)):
    if values[key] not in valid:
      raise ValueError(f"experiments/compression.py: {key}={values[key]!r}; "
                       f"valid: {', '.join(valid)}")
  try:
    seed, sparsity = int(values["seed"]), float(values["sparsity"])
  except ValueError:
    raise ValueError(f"experiments/compression.py:{arg}: seed= takes an "
                     "integer, sparsity= a number") from None
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"experiments/compression.py: sparsity={sparsity}: must "
                     "be in [0, 1)")
  return values["data"], values["method"], sparsity, seed


def _recipe(train_file, eval_file, text_fields, max_length):
  """BERT's recipe at the rate chosen on dev for full fine-tuning of this
  MiniLM (experiments/peft.py: 1e-4 on CoLA and RTE)."""
  config = default.get_config()
  config.model.name = "all-minilm-l6-v2"
  config.task = "sequence_classification"
  config.num_labels = 2
  config.data.source = "local"
  config.data.train_file = train_file
  config.data.eval_file = eval_file
  config.data.text_fields = text_fields
  config.data.label_field = "label"
  config.data.max_length = max_length
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 3.0
  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 0.01
  config.optimizer.warmup_proportion = 0.1
  config.log_every_steps = 50
  return config


def get_config(arg=None):
  """`arg`: data=..., method=..., sparsity=..., seed=... (module docstring)."""
  data, method, sparsity, seed = _parse(arg)
  if data == "quickstart":
    config = quickstart.get_config()
  elif data == "mr":
    mr = os.path.join(SHARED, "senteval_mr")
    config = _recipe(os.path.join(mr, "train.tsv"), os.path.join(mr, "dev.tsv"),
                     ("sentence",), 64)
    config.metrics = ("accuracy",)
  elif data == "rte":
    rte = os.path.join(SHARED, "glue_rte")
    config = _recipe(os.path.join(rte, "train.tsv"), os.path.join(rte, "dev.tsv"),
                     ("sentence1", "sentence2"), 128)
    config.metrics = ("accuracy",)
  else:
    cola = os.path.join(SHARED, "glue_cola")
    config = _recipe(os.path.join(cola, "train.tsv"), os.path.join(cola, "dev.tsv"),
                     ("sentence",), 64)
    config.metrics = ("matthews_corrcoef", "accuracy")
  config.seed = seed
  # Few padded lengths: each is a compilation; short sentences get 32.
  if data in ("mr", "cola"):
    config.data.buckets = (32, 64)
  elif data == "rte":
    config.data.buckets = (128,)
  config.eval_every_steps = 1_000_000  # once, after the last step
  config.keep_checkpoints = 1
  config.eval_metric = config.metrics[0]
  config.wandb.mode = "disabled"
  if method == "qat":
    config.methods = ("qat",)
    config.method_options = {"qat": {"scheme": "int8"}}
  elif method in ("magnitude", "movement"):
    name = f"{method}_pruning"
    config.methods = (name,)
    config.method_options = {name: {"sparsity": sparsity, **SCHEDULE}}
  return config
