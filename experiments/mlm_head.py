r"""A masked-LM head for a checkpoint that has none: short continued pre-training.

The packaged all-MiniLM-L6-v2 is a sentence-transformers encoder: it ships
no `cls.predictions` weights, so a prompt (research/tasks/prompt.py) reads a
freshly initialised head. This recipe trains the head, with the encoder, by
masked-LM steps on text (BERT's 15% masking, 80/10/10), and the result is
exported as BertForMaskedLM for the prompt experiments:

    python -m research.train --config experiments/mlm_head.py --workdir /tmp/mlm_head
    python -m research.export --workdir /tmp/mlm_head --out /tmp/mlm_head/hf
    # offline, from the local WikiText-2 files
    python -m research.train \
        --config "experiments/mlm_head.py:files=../shared/data/wikitext/wiki.train.tokens,eval=../shared/data/wikitext/wiki.valid.tokens" \
        --workdir /tmp/mlm_head
    # or on a task's own unlabelled text (a TSV column)
    python -m research.train \
        --config "experiments/mlm_head.py:table=../shared/data/senteval_mr/train.tsv,columns=sentence" \
        --workdir /tmp/mlm_head_mr

Default data: WikiText-2 (raw) from the Hugging Face hub
(Salesforce/wikitext, wikitext-2-raw-v1; train, held-out validation).

Args: model, files / eval (text files, ";"-separated), table / columns (a
TSV/CSV/JSONL's text columns), train (all: every weight | head: the head
only, the encoder frozen (method head_only): its sentence embeddings stay
exactly as they were, and a step skips the encoder's backward pass), steps,
batch, lr, max_length, eval_every, eval_rows. The head runs at the masked
positions only (masked_lm's sparse_prediction).

Expected result (2026-12-07, 2 CPU cores, seed 0, the offline WikiText-2
command above, 300 steps of batch 32 in 18 min): held-out masked-token
accuracy 0.000 (fresh head) -> 0.372 (step 100) -> 0.435 (step 300), loss
3.77 nats. A prompt on it stays weak: zero-shot "<s1> It was [MASK] ."
with great / terrible predicts one class on MR (0.521, the majority share);
the score great - terrible ranks MR's test sentences at AUC 0.564 only
(BENCHMARKS.md, "Few-shot and zero-shot").
"""

from experiments import _pretrain_common as common

DEFAULTS = {"model": "all-minilm-l6-v2", "files": "", "eval": "",
            "table": "", "columns": "sentence", "train": "all", "steps": 300,
            "batch": 32, "lr": 2e-4, "max_length": 128, "eval_every": 100,
            "eval_rows": 256}
TRAIN = ("all", "head")


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS, "experiments/mlm_head.py")
  if args["train"] not in TRAIN:
    raise ValueError(f"experiments/mlm_head.py:{arg}: train="
                     f"{args['train']!r}; valid: {', '.join(TRAIN)}")
  c = common.corpus_config(
      model=args["model"], train_files=common.files(args["files"]),
      eval_files=common.files(args["eval"]), max_length=args["max_length"],
      batch_size=args["batch"], total_steps=args["steps"],
      learning_rate=args["lr"], eval_rows=args["eval_rows"])
  c.optimizer.warmup_proportion = 0.06
  c.eval_every_steps = args["eval_every"]
  c.log_every_steps = 10
  c.keep_checkpoints = 1
  c.wandb.tags = ("pretraining", "mlm_head")
  if args["table"]:
    c.task_options.corpus = ""
    c.task_options.train_files = ()
    c.task_options.eval_files = ()
    c.data.source = "local"
    c.data.train_file = args["table"]
    c.data.eval_file = ""
    c.data.text_fields = common.files(args["columns"])
  elif not args["files"]:
    c.task_options.corpus = "hf"
    c.task_options.text_field = "text"
    c.data.name, c.data.hf_config = "Salesforce/wikitext", "wikitext-2-raw-v1"
    c.data.train_split, c.data.eval_splits = "train", ("validation",)
  c.task_options.sparse_prediction = True
  if args["train"] == "head":
    c.methods = ("head_only",)
  return c
