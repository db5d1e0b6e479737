"""What the pre-training experiments share: the masked-LM corpus config, args.

Not an experiment (no get_config). `pretrain_bert_base.py` (the BERT paper's
two phases on a TPU pod), `pretrain_wikitext.py` (a small BERT from scratch on
one CPU) and `continue_pretraining.py` (DAPT / TAPT from any checkpoint) build
on `corpus_config`; `parse_arg` reads their "key=value,..." args.
"""

import os

import ml_collections

from research.configs import args as args_lib
from research.configs import default
from research.tasks import masked_lm

# WikiText-2 (Merity et al. 2016), the tokenised version (its `<unk>` and
# ` @-@ ` markers): the Hugging Face dataset by default, or with `data_dir=`
# a folder holding wiki.train.tokens and wiki.valid.tokens (the same text).
WIKITEXT_HF = ("Salesforce/wikitext", "wikitext-2-v1")


def encoder(hidden, layers=4):
  """A BERT shape of Turc et al. 2019's grid: 64-wide heads, a 4x FFN."""
  return (f"hidden_size={hidden},num_hidden_layers={layers},"
          f"num_attention_heads={hidden // 64},intermediate_size={4 * hidden}")


# A 4-layer, 256-wide BERT (BERT-mini, Turc et al. 2019).
SMALL = encoder(256)
# 2 layers, 32 wide: tests and smoke runs.
TINY = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,"
        "intermediate_size=64")


def parse_arg(arg, defaults, experiment):
  """`research.configs.args.parse_arg` as a dict (files: ";"-separated)."""
  return args_lib.parse_arg(arg, defaults, experiment).to_dict()


files = args_lib.split_list  # "a.txt;b/*.txt" -> ("a.txt", "b/*.txt")


def use_wikitext(c, data_dir=""):
  """Points a `corpus_config` at WikiText-2: local files in `data_dir`, or
  (empty) the Hugging Face dataset `WIKITEXT_HF` (needs the hub)."""
  o = c.task_options
  if data_dir:
    o.corpus = "text"
    o.train_files = (os.path.join(data_dir, "wiki.train.tokens"),)
    o.eval_files = (os.path.join(data_dir, "wiki.valid.tokens"),)
  else:
    o.corpus, o.train_files, o.eval_files = "hf", (), ()
    c.data.name, c.data.hf_config = WIKITEXT_HF
    c.data.train_split, c.data.eval_splits = "train", ("validation",)
    o.text_field = "text"
  return c


def corpus_config(*, model, train_files, eval_files=(), max_length=128,
                  batch_size=32, total_steps=1000, learning_rate=1e-4,
                  warmup_steps=-1, architecture="", next_sentence=False,
                  packing="full", eval_rows=0, masking="token"):
  """A masked-LM run on text files (`research/tasks/masked_lm.py`).

  Args:
    model: the checkpoint (or, with `architecture`, the config.json and
      tokenizer) to start from: an alias, a directory or a hub name.
    train_files, eval_files: text files or globs, one document per line.
    architecture: "field=value,...": a new model of that shape, from scratch.
    The rest: the config fields of the same meaning.
  """
  c = default.get_config()
  c.model.name = model
  c.task = "masked_lm"
  # Every option of the task, so that any can be set on the command line
  # (--config.task_options.masking=span).
  c.task_options = ml_collections.ConfigDict({
      **masked_lm.Task.CONFIG, "corpus": "text", "train_files": tuple(train_files),
      "eval_files": tuple(eval_files), "packing": packing,
      "architecture": architecture, "next_sentence": next_sentence,
      "eval_rows": eval_rows, "masking": masking,
      "mask_probability": 0.15,
      # NSP reads the pooled output: the head decodes every position then.
      "sparse_prediction": not next_sentence})
  c.data.max_length = max_length
  c.batch_size = batch_size
  c.eval_batch_size = batch_size
  c.total_steps = total_steps
  c.optimizer.learning_rate = learning_rate
  c.optimizer.weight_decay = 0.01
  c.optimizer.schedule = "linear"
  c.optimizer.warmup_steps = warmup_steps
  c.metrics = ("accuracy", "perplexity")
  c.eval_metric = "loss"
  c.eval_metric_mode = "min"
  c.wandb.tags = ("pretraining",)
  return c
