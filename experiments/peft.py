r"""Parameter-efficient fine-tuning of the packaged MiniLM: one method, one task.

    python -m research.train --config experiments/peft.py:task=quickstart,method=lora \
        --workdir /tmp/peft/quickstart_lora
    python -m research.train --config experiments/peft.py:task=cola,method=adalora,lr=1e-3 \
        --config.seed=1 --workdir /tmp/peft/cola_adalora_s1

`arg` (key=value, comma-separated):
  task    quickstart (data/quickstart, 3 epochs), cola or rte (GLUE dev in
          ../shared/data/glue_<task>, the BERT paper's recipe: batch 32, 3
          epochs, linear decay, 10% warm-up);
  method  full (every weight), lora (r=8, alpha=16, query and value),
          adalora (init_r=12 -> target_r=8 on query and value; tinit 10%,
          tfinal 30% of the run, a mask every 1% of it), houlsby, pfeiffer
          (adapters, reduction factor 16), prefix (20 prefixes, MLP during
          training), bitfit;
  lr      the peak learning rate (default: LEARNING_RATES[task][method],
          the values BENCHMARKS.md reports, chosen on dev as it says);
  pooler  true: train BERT's pooler with the head (the methods' `pooler`
          option; default false, as PEFT). all-minilm-l6-v2's pooler was
          never trained (a mean-pooling sentence model): a linear probe on
          its frozen output reaches CoLA MCC 0.05, on mean-pooled states
          0.13 (BENCHMARKS.md).

The results table (3 seeds per method) is in BENCHMARKS.md, "Parameter-
efficient fine-tuning"; `research.results --workdir` summarises a folder of
runs.
"""

import math
import os

from experiments import glue_cola, quickstart

SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "..", "..", "shared", "data"))
TRAIN_ROWS = {"quickstart": 320, "cola": 8551, "rte": 2490}

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


def _parse(arg):
  values = {"task": "quickstart", "method": "lora", "lr": "", "pooler": "false"}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, _, value = item.partition("=")
    if key not in values:
      raise ValueError(f"experiments/peft.py:{arg}: unknown key {key!r}; "
                       f"valid: {', '.join(values)}")
    values[key] = value
  if values["task"] not in TRAIN_ROWS:
    raise ValueError(f"experiments/peft.py: task={values['task']!r}; valid: "
                     f"{', '.join(TRAIN_ROWS)}")
  if values["pooler"] not in ("true", "false"):
    raise ValueError(f"experiments/peft.py: pooler={values['pooler']!r}; "
                     "valid: true, false")
  if values["method"] not in METHODS:
    raise ValueError(f"experiments/peft.py: method={values['method']!r}; "
                     f"valid: {', '.join(METHODS)}")
  return values


def _glue(task):
  """CoLA's or RTE's recipe on the MiniLM, local TSVs from ../shared/data."""
  config = glue_cola.get_config()
  config.model.name = "all-minilm-l6-v2"
  config.data.source = "local"
  config.data.name = ""
  config.data.train_file = os.path.join(SHARED, f"glue_{task}", "train.tsv")
  config.data.eval_file = os.path.join(SHARED, f"glue_{task}", "dev.tsv")
  config.data.label_field = "label"
  config.data.label_names = ()
  if task == "rte":
    config.data.text_fields = ("sentence1", "sentence2")
    config.metrics = ("accuracy",)
    config.eval_metric = "accuracy"
  config.wandb.mode = "disabled"
  return config


def get_config(arg=None):
  """See the module docstring."""
  args = _parse(arg)
  task, method = args["task"], args["method"]
  config = quickstart.get_config() if task == "quickstart" else _glue(task)
  names, options = METHODS[method]
  config.methods = names
  if names:
    options = dict(options)
    if method == "adalora":
      steps = math.floor(TRAIN_ROWS[task] / config.batch_size) * config.num_epochs
      options.update(tinit=int(0.1 * steps), tfinal=int(0.3 * steps),
                     delta_t=max(1, int(0.01 * steps)))
    options["pooler"] = args["pooler"] == "true"
    with config.method_options.unlocked():
      config.method_options[names[0]] = options
  config.optimizer.learning_rate = (float(args["lr"]) if args["lr"]
                                    else LEARNING_RATES[task][method])
  config.keep_checkpoints = 1
  return config
