r"""Continued pre-training (DAPT / TAPT) of any checkpoint on your own text.

Domain-adaptive (DAPT) and task-adaptive (TAPT) pre-training, Gururangan et
al. (2020), "Don't Stop Pretraining": more masked-LM training of a released
checkpoint on unlabelled text of the target domain (DAPT) or on the task's own
training text (TAPT), before fine-tuning.

    # DAPT on text files (one document per line; ";" between files or globs)
    nice -n 10 python -m research.train \
        --config "experiments/continue_pretraining.py:files=my/*.txt,eval=my_dev.txt" \
        --workdir /tmp/dapt
    # TAPT on a task's own training sentences (a TSV/CSV/JSONL column)
    python -m research.train \
        --config "experiments/continue_pretraining.py:table=../shared/data/glue_cola/train.tsv,eval=../shared/data/glue_cola/dev.tsv,columns=sentence" \
        --workdir /tmp/tapt_cola
    # then: the result as a Hugging Face directory (BertForMaskedLM) ...
    python -m research.export --workdir /tmp/tapt_cola --out /tmp/tapt_cola/hf
    # ... which a fine-tuning experiment starts from
    python -m research.train --config experiments/glue_cola.py:model=/tmp/tapt_cola/hf \
        --workdir /tmp/cola_after_tapt

Defaults: the packaged all-MiniLM-L6-v2 (it has no MLM head: a new one is
initialised and the log says so), WikiText-2 train / valid (the Hugging
Face dataset; `data_dir=` a folder of wiki.train.tokens and
wiki.valid.tokens, e.g. ../shared/data/wikitext), rows of 128
tokens, batch 16, AdamW lr 3e-4 with 6% warmup and linear decay, 40 steps
(a CPU budget: Gururangan et al. train far longer), masked-LM accuracy and
perplexity on the first 128 held-out rows every 10 steps.

Expected result (BENCHMARKS.md, "Pre-training and task-adaptive pre-training"; measured on 2 shared CPU
cores, ~12 min): held-out masked-token accuracy 0.000 before (the fresh
head) and 0.180 after 40 steps; loss 10.96 -> 5.91 nats (perplexity 57,641
-> 367), still falling.

TAPT measured (BENCHMARKS.md, "Pre-training and task-adaptive pre-training"; one H200, 3
seeds): `table=` CoLA's or RTE's train.tsv, steps=1000, batch=64, then
`experiments/peft.py:task=...,method=full,lr=1e-4` with
`--config.model.name=<the export>`: RTE dev accuracy 0.573 +- 0.025 (plain)
-> 0.627 +- 0.009; CoLA MCC 0.261 +- 0.016 -> 0.244 +- 0.031 (no gain). The
export keeps the base checkpoint's pooler (a masked-LM model has none).

Masking (`masking=`): token (default), whole_word, span (SpanBERT) or
knowledge (ERNIE: the names of `knowledge=`, one per line, masked whole;
`ignore_case=1` matches any letter case). E.g. TAPT on CoNLL-2003's text
with its own entity list (docs/pretraining.md):

    python -m research.data.knowledge --conll ../shared/data/conll2003/train.txt \
        --out /tmp/conll_entities.txt
    python -m research.train --config "experiments/continue_pretraining.py:\
files=/tmp/conll_train.txt,eval=/tmp/conll_valid.txt,masking=knowledge,\
knowledge=/tmp/conll_entities.txt" --workdir /tmp/tapt_conll_knowledge

Args: model (alias, directory or hub name), files / table (training text;
neither: WikiText-2, from data_dir= if given),
eval (held-out file), columns (a table's text columns, ";"-separated),
steps, batch, lr, max_length, eval_every, eval_rows, masking, knowledge,
ignore_case.
"""

from experiments import _pretrain_common as common

DEFAULTS = {"model": "all-minilm-l6-v2",
            "files": "", "table": "", "eval": "", "data_dir": "",
            "columns": "sentence", "steps": 40, "batch": 16, "lr": 3e-4,
            "max_length": 128, "eval_every": 10, "eval_rows": 128,
            "masking": "token", "knowledge": "", "ignore_case": False}


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS, "experiments/continue_pretraining.py")
  c = common.corpus_config(
      model=args["model"], train_files=common.files(args["files"]),
      eval_files=common.files(args["eval"]), max_length=args["max_length"],
      batch_size=args["batch"], total_steps=args["steps"],
      learning_rate=args["lr"], eval_rows=args["eval_rows"],
      masking=args["masking"])
  if not args["files"] and not args["table"]:  # the default text
    common.use_wikitext(c, args["data_dir"])
  c.task_options.knowledge_file = args["knowledge"]
  c.task_options.knowledge_ignore_case = args["ignore_case"]
  c.optimizer.warmup_proportion = 0.06
  c.eval_every_steps = args["eval_every"]
  c.log_every_steps = 10
  c.keep_checkpoints = 1
  if args["table"]:
    # TAPT on a table's text column(s): config.data's rows, masked the same.
    c.task_options.corpus = ""
    c.task_options.train_files = ()
    c.task_options.eval_files = ()
    c.data.source = "local"
    c.data.train_file = args["table"]
    c.data.eval_file = args["eval"]
    c.data.text_fields = common.files(args["columns"])
  return c
