"""What the pre-training experiments share: the masked-LM corpus config, args.

Not an experiment (no get_config). `pretrain_bert_base.py` (the BERT paper's
two phases on a TPU pod), `pretrain_wikitext.py` (a small BERT from scratch on
one CPU) and `continue_pretraining.py` (DAPT / TAPT from any checkpoint) build
on `corpus_config`; `parse_arg` reads their "key=value,..." args.
"""

import os

import ml_collections

from research.configs import default
from research.tasks import masked_lm

SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "..", "..", "shared", "data"))
WIKITEXT = os.path.join(SHARED, "wikitext")
# A 4-layer, 256-wide BERT (BERT-mini's width, Turc et al. 2019).
SMALL = ("hidden_size=256,num_hidden_layers=4,num_attention_heads=4,"
         "intermediate_size=1024")
# 2 layers, 32 wide: tests and smoke runs.
TINY = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,"
        "intermediate_size=64")


def parse_arg(arg, defaults, experiment):
  """Parses "key=value,..." over `defaults` (each value takes its type).

  Files are separated by ";" inside a value ("files=a.txt;b.txt").

  Raises:
    ValueError: an unknown key or a value of the wrong type, naming the valid
      keys.
  """
  values = dict(defaults)
  for item in (s.strip() for s in (arg or "").split(",")):
    if not item:
      continue
    key, sep, value = (p.strip() for p in item.partition("="))
    if not sep or key not in defaults:
      raise ValueError(f"{experiment}:{arg}: {item!r} is not a known "
                       f"key=value; valid keys: "
                       f"{', '.join(f'{k}=' for k in defaults)}")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        values[key] = value.lower() in ("true", "1")
      else:
        values[key] = kind(value)
    except ValueError:
      raise ValueError(f"{experiment}:{arg}: {key}={value!r} is not "
                       f"{kind.__name__}") from None
  return values


def files(value):
  """"a.txt;b/*.txt" -> ("a.txt", "b/*.txt")."""
  return tuple(p for p in (s.strip() for s in value.split(";")) if p)


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
      "mask_probability": 0.15})
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
