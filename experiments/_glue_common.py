"""What the nine experiments/glue_*.py configs share: the BERT paper's recipe.

Not an experiment (no get_config). Each glue_<task>.py sets its own data
columns, labels and metrics and takes the rest from here:

- the fine-tuning recipe of Devlin et al. (2018), section 4.1 and appendix
  A.3: batch 32, 3 epochs, AdamW (weight decay 0.01), linear warmup over the
  first 10% of steps then linear decay, dropout 0.1, max length 128, gradient
  norm clipped at 1.0 (as the released BERT code), learning rate chosen on dev
  from {5e-5, 4e-5, 3e-5, 2e-5} (`get_sweep`);
- `arg` parsing (`research.configs.args`, big_vision style):
  "key=value,key=value" after the colon, e.g.
  `experiments/glue_sst2.py:model=bert-large-cased,source=hf`.
"""

import os

from research.configs import args as args_lib
from research.configs import default

# `model=` -> what config.model.name gets: hub ids (downloaded on first use)
# and the packaged offline checkpoint (for a quick check without internet).
MODELS = {
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "bert-large-cased": "google-bert/bert-large-cased",
    "all-minilm-l6-v2": "all-minilm-l6-v2",
}
SOURCES = ("tfds", "hf")  # tfds glue/<task> | Hugging Face nyu-mll/glue
# lr: the paper's learning-rate grid x seeds. full: also its batch sizes
# {16, 32} and epochs {2, 3, 4} (24 points per seed).
GRIDS = ("lr", "full")
LEARNING_RATES = (5e-5, 4e-5, 3e-5, 2e-5)

# Every `arg` key and its default; the type of the default is the value type.
ARG_DEFAULTS = {
    "model": "bert-base-uncased",
    "source": "tfds",
    "seeds": 5,       # seeds per grid point (get_sweep)
    "grid": "lr",     # get_sweep's grid: lr | full
}


def parse_arg(arg, experiment, defaults=None, choices=None):
  """Parses `arg` ("key=value,...") over `defaults` (ARG_DEFAULTS).

  `research.configs.args.parse_arg`, plus what GLUE-style experiments
  share: `model=` may also be a checkpoint directory, and `seeds` >= 1.

  Args:
    arg: the text after the colon in `--config experiments/x.py:arg`, or
      None.
    experiment: the config file, named in error messages.
    defaults: {key: default} (the default's type is the value's type);
      None: ARG_DEFAULTS.
    choices: {key: valid values}; None: GLUE's model, source and grid.

  Returns:
    {key: value} for every key of `defaults`.

  Raises:
    ValueError: an unknown key, a malformed item or an invalid value, naming
      the valid ones.
  """
  defaults = ARG_DEFAULTS if defaults is None else defaults
  if choices is None:
    choices = {"model": MODELS, "source": SOURCES, "grid": GRIDS}
  models = choices.get("model")
  values = args_lib.parse_arg(
      arg, defaults, experiment,
      {k: v for k, v in choices.items() if k != "model"}).to_dict()
  # A local checkpoint (e.g. continued pre-training's export) is a model too.
  if models is not None and values["model"] not in models and not \
      os.path.isfile(os.path.join(values["model"], "config.json")):
    raise ValueError(f"{experiment}:{arg}: model={values['model']!r}; valid: "
                     f"{', '.join(models)} or a checkpoint directory (with "
                     "config.json)")
  if values.get("seeds", 1) < 1:
    raise ValueError(f"{experiment}:{arg}: seeds={values['seeds']} must be "
                     ">= 1")
  return values


def use_local_files(config, args, arg, experiment, fmt, what):
  """Points `config.data` at args' train_file= and eval_file= (source=local).

  Raises:
    ValueError: either file is not given, naming `what` they should be.
  """
  if not args["train_file"] or not args["eval_file"]:
    raise ValueError(f"{experiment}:{arg}: source=local needs train_file= "
                     f"and eval_file= ({what})")
  config.data.source, config.data.name = "local", ""
  config.data.train_file = args["train_file"]
  config.data.eval_file = args["eval_file"]
  config.data.format = fmt


def get_config(task, arg, experiment):
  """The paper's recipe for GLUE `task`; model and data source from `arg`.

  Args:
    task: the GLUE task as TFDS and nyu-mll/glue name it ("sst2", "mnli").
    arg: see `parse_arg`.
    experiment: the config file, for messages.

  Returns:
    A config whose task-specific fields (text_fields, label_names,
    num_labels, metrics, eval_metric, eval_splits) the caller sets.
  """
  args = parse_arg(arg, experiment)
  config = default.get_config()
  config.model.name = MODELS.get(args["model"], args["model"])
  config.model.hidden_dropout = 0.1
  config.model.attention_dropout = 0.1
  if args["source"] == "tfds":
    config.data.source = "tfds"
    config.data.name = f"glue/{task}"
  else:
    config.data.source = "hf"
    config.data.name = "nyu-mll/glue"
    config.data.hf_config = task
  config.data.train_split = "train"
  config.data.max_length = 128
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 3.0
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-5  # one of the grid; sweeps set it
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = "linear"
  config.optimizer.warmup_proportion = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.log_every_steps = 50
  # Resuming needs the latest checkpoint, research.predict the best one; more
  # would cost 3x the model size each (parameters + Adam moments) per run.
  config.keep_checkpoints = 1
  config.wandb.project = "research-bert-glue"
  config.wandb.tags = ("glue", task, args["model"])
  return config


def get_sweep(arg, experiment):
  """The paper's grid: learning rates (and batch sizes, epochs) x seeds.

  Returns:
    {config field: values}, for research.sweep (the Cartesian product).
  """
  args = parse_arg(arg, experiment)
  grid = {"optimizer.learning_rate": list(LEARNING_RATES)}
  if args["grid"] == "full":
    grid["batch_size"] = [16, 32]
    grid["num_epochs"] = [2.0, 3.0, 4.0]
  grid["seed"] = list(range(args["seeds"]))
  return grid
