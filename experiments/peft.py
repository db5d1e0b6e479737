r"""Parameter-efficient fine-tuning of the packaged MiniLM: one method, one task.

    python -m research.train --config experiments/peft.py:task=quickstart,method=lora \
        --workdir /tmp/peft/quickstart_lora
    python -m research.train --config experiments/peft.py:task=cola,method=adalora,lr=1e-3 \
        --config.seed=1 --workdir /tmp/peft/cola_adalora_s1

`arg` (key=value, comma-separated):
  task    quickstart (data/quickstart, 3 epochs), cola or rte (TFDS
          glue/<task>, the BERT paper's recipe: batch 32, 3 epochs, linear
          decay, 10% warm-up);
  data_dir  cola / rte from a folder of GLUE's train.tsv and dev.tsv
          instead (e.g. ../shared/data/glue_cola);
  method  full (every weight), lora (r=8, alpha=16, query and value),
          adalora (init_r=12 -> target_r=8 on query and value; tinit 10%,
          tfinal 30% of the run, a mask every 1% of it), houlsby, pfeiffer
          (adapters, reduction factor 16), prefix (20 prefixes, MLP during
          training), bitfit;
  lr      the peak learning rate (default: LEARNING_RATES[task][method],
          the values BENCHMARKS.md reports, chosen on dev as it says);
  pooler  true: train BERT's pooler with the head (the methods' `pooler`
          option; default false, as PEFT). Only with
          `--config.model.pooling=pooler`: the default (`auto`) pools
          all-minilm-l6-v2 by mean, as it was trained, and it has no pooler
          (docs/pooling.md). Its pooler was never trained: a linear probe on
          its frozen output reaches CoLA MCC 0.05, on mean-pooled states
          0.13 (BENCHMARKS.md).

The results table (3 seeds per method) is in BENCHMARKS.md, "Parameter-
efficient fine-tuning"; `research.results --workdir` summarises a folder of
runs.
"""

import math

from experiments import _glue_minilm as glue
from experiments import quickstart
from research import methods
from research.configs.args import parse_arg

TRAIN_ROWS = {"quickstart": 320, **glue.TRAIN_ROWS}

# method -> (config.methods, method_options)
METHODS = {
    "full": ((), {}),
    "lora": (("lora",), {"r": 8, "alpha": 16.0}),
    "adalora": (("adalora",), {"init_r": 12, "target_r": 8, "alpha": 16.0}),
    "houlsby": (("adapters",), {"kind": "houlsby", "reduction_factor": 16}),
    "pfeiffer": (("adapters",), {"kind": "pfeiffer", "reduction_factor": 16}),
    "prefix": (("prefix_tuning",), {"length": 20, "projection": True,
                                     "projection_size": 256}),
    "bitfit": (("bitfit",), {}),
}
# Peak learning rates per task and method (BENCHMARKS.md). CoLA and RTE:
# the best final dev metric of seed 0 over LR_GRID of
# benchmarks/gpu_tables.py; CoLA's adalora and bitfit with pooler=true (with
# the pooler frozen no value left the majority class); pfeiffer: houlsby's
# (not measured).
LEARNING_RATES = {
    # full: the quickstart's own; lora {2e-3, 5e-3}, adalora {2e-3, 1e-2},
    # bitfit {1e-2, 1e-3}: the best final dev accuracy of seed 0; the others
    # one value each (not tuned).
    "quickstart": {"full": 2e-4, "lora": 5e-3, "adalora": 1e-2,
                   "houlsby": 2e-3, "pfeiffer": 2e-3, "prefix": 5e-3,
                   "bitfit": 1e-3},
    "cola": {"full": 1e-4, "lora": 1e-3, "adalora": 5e-3, "houlsby": 2e-3,
             "pfeiffer": 2e-3, "prefix": 2e-3, "bitfit": 1e-3},
    "rte": {"full": 1e-4, "lora": 1e-3, "adalora": 2e-3, "houlsby": 2e-3,
            "pfeiffer": 2e-3, "prefix": 2e-3, "bitfit": 1e-3},
}


ARGS = {"task": "quickstart", "method": "lora", "lr": 0.0, "pooler": False,
        "data_dir": ""}


def get_config(arg=None):
  """See the module docstring."""
  args = parse_arg(arg, ARGS, "experiments/peft.py",
                   {"task": tuple(LEARNING_RATES), "method": tuple(METHODS)})
  task, method = args.task, args.method
  if task == "quickstart":
    config = quickstart.get_config()
  else:
    config = glue.get_config(task, args.data_dir)
    config.eval_batch_size = 128
    config.model.hidden_dropout = 0.1
    config.model.attention_dropout = 0.1
    config.wandb.mode = "disabled"
  names, options = METHODS[method]
  config.methods = names
  if names:
    options = dict(options)
    if method == "adalora":
      steps = math.floor(TRAIN_ROWS[task] / config.batch_size) * config.num_epochs
      options.update(tinit=int(0.1 * steps), tfinal=int(0.3 * steps),
                     delta_t=max(1, int(0.01 * steps)))
    options["pooler"] = args.pooler
    with config.method_options.unlocked():
      config.method_options[names[0]] = methods.with_defaults(names[0],
                                                              **options)
  config.optimizer.learning_rate = (args.lr if args.lr > 0
                                    else LEARNING_RATES[task][method])
  config.keep_checkpoints = 1
  return config
