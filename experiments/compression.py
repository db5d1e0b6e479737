r"""Compression of a fine-tuned MiniLM: the training-time rows of the table.

One run of the packaged all-MiniLM-L6-v2 per (data, method, sparsity, seed):

    python -m research.train \
        --config experiments/compression.py:data=mr,method=magnitude,sparsity=0.9,seed=0,data_dir=../shared/data/senteval_mr \
        --workdir /tmp/compression/mr/magnitude0.9/0

`arg` (key=value, comma-separated):
  data=quickstart (default) | mr | rte | cola: the shipped review set (its
    recipe: batch 16, 3 epochs, lr 2e-4, 64 tokens), SentEval MR (needs
    data_dir=, a folder of train.tsv and dev.tsv) or GLUE RTE / CoLA (TFDS,
    or data_dir= their TSVs, e.g. ../shared/data/glue_rte),
    these three with BERT's recipe at the rate chosen on dev for this MiniLM
    (3 epochs of batch 32, lr 1e-4, warmup 10%, decay 0.01; 64 tokens, RTE
    128);
  method=plain (default: the fp32 teacher) | qat (int8 quantisation-aware
    training, `research/methods/qat.py`) | magnitude (Zhu & Gupta) |
    movement (Sanh et al.);
  sparsity=0.5 (default) | any fraction in [0, 1): the pruning methods';
  seed=N;
  data_dir= local TSVs instead of TFDS (required for mr).

Pruning: the cubic schedule from 10% to 70% of the updates, masks every 10
updates (movement pruning's paper recomputes every update; a recomputation
costs ~1 s on 2 CPU cores for MiniLM's 10.6M weights), then 30% of the run
at the final sparsity. Every run evaluates once, after its last step (the
metrics of the last step; no checkpoint chosen on dev).

The post-training rows (int8 PTQ, weight-only int8, 50% of heads removed)
take the plain runs' checkpoints (`research.compress`); the table is
`benchmarks/compression.py`. Results (BENCHMARKS.md "Compression:
distillation, int8 and pruning"), quickstart, 3 seeds: fp32 0.917 ± 0.015,
int8 PTQ 0.920 ± 0.026, QAT 0.917 ± 0.021, magnitude 50% 0.867 ± 0.015 and
90% 0.613 ± 0.081; movement pruning collapses to the majority class (0.500)
in runs this short (research/methods/movement_pruning.py says why).
"""

from experiments import _glue_minilm as glue
from experiments import quickstart

DATA = ("quickstart", "mr", "rte", "cola")
METHODS = ("plain", "qat", "magnitude", "movement")
# Pruning's schedule (fractions of the run's updates) and mask period.
SCHEDULE = {"begin": 0.1, "end": 0.7, "frequency": 10}


def _parse(arg):
  values = {"data": "quickstart", "method": "plain", "sparsity": "0.5",
            "seed": "0", "data_dir": ""}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep or key not in values:
      raise ValueError(f"experiments/compression.py:{arg}: {item!r}; valid "
                       "keys: data=, method=, sparsity=, seed=, data_dir=")
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
  return values["data"], values["method"], sparsity, seed, values["data_dir"]


def get_config(arg=None):
  """`arg`: data=..., method=..., sparsity=..., seed=... (module docstring)."""
  data, method, sparsity, seed, data_dir = _parse(arg)
  if data == "quickstart":
    config = quickstart.get_config()
  else:  # BERT's recipe on the MiniLM: TFDS, or data_dir='s TSVs (MR: required)
    config = glue.get_config(data, data_dir, 128 if data == "rte" else 64)
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
