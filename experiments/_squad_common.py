"""What experiments/squad_v1.py and squad_v2.py share: BERT's SQuAD recipe.

Not an experiment (no get_config). Devlin et al. (2018), section 4.2-4.3
and the released run_squad.py: max length 384, document stride 128,
questions cut to 64 tokens, answers of at most 30 tokens from the 20 best
start and end positions, AdamW with 10% warmup then linear decay, dropout
0.1. `arg` ("key=value,...", experiments/_glue_common.parse_arg): model=,
source=tfds|hf|local (local: train_file=, eval_file=, the official JSON),
max_length=, doc_stride= (a 2-core CPU run may shorten them).
"""

from experiments import _glue_common as common

ARGS = {"model": "bert-base-uncased", "source": "tfds", "train_file": "",
        "eval_file": "", "max_length": 384, "doc_stride": 128}
SOURCES = ("tfds", "hf", "local")


def get_config(arg, experiment, *, tfds_name, hf_name, version_2, epochs,
               learning_rate, batch_size):
  """The SQuAD recipe for one version; model and data from `arg`.

  Args:
    arg: see the module docstring.
    experiment: the config file, for messages.
    tfds_name, hf_name: the dataset's names in TFDS and on the hub.
    version_2: SQuAD v2.0 (unanswerable questions, null threshold).
    epochs, learning_rate, batch_size: the version's recipe.

  Returns:
    The config.
  """
  args = common.parse_arg(arg, experiment, ARGS, {
      "model": common.MODELS, "source": SOURCES})
  config = common.get_config("squad", None, experiment)
  config.model.name = common.MODELS[args["model"]]
  config.task = "question_answering"
  config.task_options = {"doc_stride": args["doc_stride"],
                         # -1: 64, or half of a shorter max_length.
                         "max_query_length": -1, "version_2": version_2}
  config.data.text_fields = ("question", "context")
  config.data.label_field = "answers"
  if args["source"] == "tfds":
    config.data.name = tfds_name
  elif args["source"] == "hf":
    config.data.source, config.data.name = "hf", hf_name
    config.data.hf_config = ""
  else:
    common.use_local_files(config, args, arg, experiment, "squad",
                           "official SQuAD JSON files")
  config.data.eval_splits = ("validation",)
  config.data.max_length = args["max_length"]
  config.num_labels = 2
  config.num_epochs = float(epochs)
  config.optimizer.learning_rate = learning_rate
  config.batch_size = batch_size
  config.eval_batch_size = 64
  config.metrics = (("exact_match", "f1", "has_ans_exact_match", "has_ans_f1",
                     "no_ans_exact_match", "no_ans_f1", "best_exact_match",
                     "best_f1", "best_null_threshold") if version_2
                    else ("exact_match", "f1"))
  # v2.0: F1 at the threshold chosen on dev, as the paper reports it.
  config.eval_metric = "best_f1" if version_2 else "f1"
  config.wandb.project = "research-bert-squad"
  config.wandb.tags = (experiment.rsplit("/", 1)[-1][:-3], args["model"])
  return config
