r"""CoNLL-2003 English NER: token classification, entity F1 as conlleval.

    python -m research.train --config experiments/conll2003.py \
        --workdir /tmp/conll2003
    python -m research.predict --workdir /tmp/conll2003 --out /tmp/ner_out

`arg`: model=bert-base-cased (default; NER needs case), bert-base-uncased,
bert-large-cased, bert-large-uncased, all-minilm-l6-v2 (the packaged
offline checkpoint); source=tfds (conll2003, default), hf
(eriktks/conll2003's parquet conversion) or local with train_file= and
eval_file= (CoNLL column files: token ... tag, IOB1 or IOB2). E.g. offline:

    python -m research.train --config experiments/conll2003.py:\
model=all-minilm-l6-v2,source=local,\
train_file=../shared/data/conll2003/train.txt,\
eval_file=../shared/data/conll2003/valid.txt \
        --config.optimizer.learning_rate=1e-4 --config.num_epochs=3 \
        --workdir /tmp/conll_minilm

research.predict writes <split>.conll (`token gold predicted`, one word a
line: words, not sub-tokens) for each evaluation split.

Recipe: batch 32, max length 128, AdamW lr 5e-5 with 10% warmup then linear
decay, 4 epochs, dropout 0.1; the first sub-token of each word carries its
tag (task_options.label_all_subtokens=True labels them all). Metrics:
entity F1 / precision / recall (seqeval, conlleval's rules) and word
accuracy; entity F1 selects the best checkpoint.

Expected: the paper's numbers (published, not measured here): dev F1 96.4
(BERT-BASE), 96.6 (BERT-LARGE), test F1 92.4 / 92.8 (Devlin et al. 2018,
Table 7; the paper fine-tunes with document context). Measured here (2
shared CPU cores, BENCHMARKS.md "CoNLL-2003 NER"): all-minilm-l6-v2,
the offline command above (lr 1e-4, seed 0), stopped after epoch 1 of 3:
valid.txt entity F1 0.8764 (precision 0.8716, recall 0.8812), 13.5 min of
training, about 23 min to the evaluation.
"""

from experiments import _glue_common as common
from research.data import conll

EXPERIMENT = "experiments/conll2003.py"
ARGS = {"model": "bert-base-cased", "source": "tfds", "train_file": "",
        "eval_file": ""}
SOURCES = ("tfds", "hf", "local")


def get_config(arg=None):
  """CoNLL-2003 NER: the recipe above; model and data from `arg`."""
  args = common.parse_arg(arg, EXPERIMENT, ARGS, {
      "model": common.MODELS, "source": SOURCES})
  config = common.get_config("conll2003", None, EXPERIMENT)
  config.model.name = common.MODELS[args["model"]]
  config.task = "token_classification"
  config.data.text_fields = ("tokens",)
  if args["source"] == "tfds":
    config.data.name, config.data.label_field = "conll2003", "ner"
  elif args["source"] == "hf":
    config.data.source, config.data.hf_config = "hf", ""
    config.data.name, config.data.label_field = "eriktks/conll2003", "ner_tags"
  else:
    common.use_local_files(config, args, arg, EXPERIMENT, "conll",
                           "CoNLL column files")
  config.data.eval_splits = ("validation",)
  config.data.label_names = conll.CONLL2003_TAGS
  config.num_labels = len(conll.CONLL2003_TAGS)
  config.optimizer.learning_rate = 5e-5
  config.num_epochs = 4.0
  config.metrics = ("entity_f1", "entity_precision", "entity_recall",
                    "accuracy")
  config.eval_metric = "entity_f1"
  config.wandb.project = "research-bert-ner"
  config.wandb.tags = ("conll2003", args["model"])
  return config
