r"""Differentially private fine-tuning (DP-SGD) of the packaged MiniLM.

    python -m research.train --config experiments/dp_sgd.py:data=quickstart,epsilon=8 \
        --workdir /tmp/dp/qs_eps8
    python -m research.train --config experiments/dp_sgd.py:data=rte,epsilon=3,seed=1 \
        --workdir /tmp/dp/rte_eps3_s1

`arg` ("key=value,..."): data=quickstart (the shipped review set, 320
training sentences) | rte | cola (TFDS glue/<task>, or data_dir= a folder of
GLUE's train.tsv and dev.tsv, e.g. ../shared/data/glue_rte) | mr (SentEval's
movie-review polarity, 8,529 training sentences, the closest here to Li et
al.'s SST-2; data_dir= is required: ../shared/data/senteval_mr); epsilon=8
(> 0: DP-SGD at that target, delta = min(1e-5, 1/(N ln N)); 0: the data
set's usual non-private recipe, the baseline); seed=0; method=full (every
weight) | bitfit (biases and the head, research/methods/bitfit.py, at lr
1e-2: DP-BitFit). The sentence pooling is the model's
(`config.model.pooling`, auto: mean for the packaged MiniLM, whose pooler
was never trained); with `--config.model.pooling=pooler` DP-BitFit should
train the pooler too (`--config.method_options.bitfit.pooler=True`).

The private recipe follows Li, Tramer, Liang and Hashimoto (2022), "Large
Language Models Can Be Strong Differentially Private Learners": DP-SGD
needs (1) large batches, since the noise std sigma*C is divided by the
batch, so the signal-to-noise ratio grows with it (here q = B/N of about
0.1-0.2: B = 64 of 320 quickstart sentences, 256 of RTE's 2,490); (2) more
epochs than non-private fine-tuning, since each step carries less signal;
(3) a higher learning rate (5e-4 for Adam instead of 2e-5), and (4) a small
clipping norm (C = 0.1, so that nearly every example is clipped and the
update is a mean of normalised gradients). Poisson sampling (the accountant's
assumption), RDP accountant, noise calibrated before training for the
planned steps. Global gradient clipping after the noise would only rescale
Adam's input, so it is off; the warmup stays (10% of the steps).

Measured (BENCHMARKS.md "Differential privacy (DP-SGD)", 3 seeds each): on the
quickstart set (2 CPU cores) method=bitfit reaches dev accuracy 0.693 +-
0.021 at epsilon 8, 0.600 +- 0.036 at 3, 0.547 +- 0.021 at 1 (majority
class 0.50; non-private full fine-tuning 0.917 +- 0.015). On CoLA (one
NVIDIA H100; `--config.method_options.dp_sgd.chunk_size=32`: a GPU wants
bigger chunks
than the CPU default of 8) full fine-tuning under DP-SGD ends at the
majority class (MCC 0) at epsilon 8, 3 and 1, every seed, and at lr 5e-4,
2e-4 and 1e-4, against 0.290 +- 0.019 non-private. Its dev loss ends at
1.87-1.92 whatever the noise (sigma 0.80 to 2.84): a confident constant,
consistent with clipping bias on a 70/30 task (each example pushes with
norm C however well it is already classified). Full DP-SGD on a CPU runs
at 46-63 s per step (per-example gradients of all 22.7M weights).
"""

import math

from experiments import _glue_minilm as glue
from experiments import quickstart
from research import methods
from research.configs.args import parse_arg

ARGS = {"data": "quickstart", "epsilon": 8.0, "seed": 0, "method": "full",
        "data_dir": ""}
CHOICES = {"data": ("quickstart", "rte", "cola", "mr"),
           "method": ("full", "bitfit")}
# method=bitfit: biases and the head only (research/methods/bitfit.py), at
# BitFit's learning rate; per-example gradients of 27k weights, not 22.7M.
BITFIT_LEARNING_RATE = 1e-2
MAX_LENGTH = {"rte": 128, "cola": 64, "mr": 64}  # MR: 6 of 8,529 cut at 64
# The private recipe per data set: (batch size, epochs).
PRIVATE = {"quickstart": (64, 15.0), "rte": (256, 15.0), "cola": (512, 10.0),
           "mr": (512, 10.0)}


def get_config(arg=None):
  """The non-private recipe (epsilon=0) or DP-SGD at `epsilon`."""
  values = parse_arg(arg, ARGS, "experiments/dp_sgd.py", CHOICES)
  name = values["data"]
  if name == "quickstart":
    config = quickstart.get_config()
  else:
    config = glue.get_config(name, values["data_dir"], MAX_LENGTH[name])
    config.log_every_steps = 10
    config.keep_checkpoints = 2
  config.seed = values["seed"]
  config.wandb.project = "research-bert-dp"
  if values["epsilon"] > 0:
    batch, epochs = PRIVATE[name]
    config.methods = ("dp_sgd",)
    config.method_options = {"dp_sgd": methods.with_defaults(
        "dp_sgd", target_epsilon=values["epsilon"], clip_norm=0.1)}
    config.batch_size = batch
    config.num_epochs = epochs
    config.optimizer.learning_rate = 5e-4
    config.optimizer.grad_clip_norm = 0.0
    # The padded Poisson batch: 4 standard deviations above the mean, to a
    # multiple of 8 (the sampler's default rounds to a multiple of 64 here,
    # 128 rows for 64 expected: every padding row costs a per-example
    # gradient).
    config.data.sampler_options = {
        "max_batch_size": 8 * math.ceil((batch + 4 * math.sqrt(batch)) / 8)}
  if values["method"] == "bitfit":  # before dp_sgd, which must come last
    config.methods = ("bitfit",) + tuple(config.methods)
    with config.method_options.unlocked():
      config.method_options.bitfit = methods.with_defaults("bitfit")
    config.optimizer.learning_rate = BITFIT_LEARNING_RATE
  return config
