"""What the few-shot experiments share: data presets, prompts, arg parsing.

Not an experiment (no get_config). `fewshot_finetune.py` (standard
fine-tuning), `fewshot_prompt.py` (prompt-based, LM-BFF / PET) and
`fewshot_setfit.py` (SetFit-style contrastive) build on `base_config`; the
protocol runs them (`python -m research.fewshot`, see
research/fewshot/protocol.py): each config's training data is the pool the
K-shot sets are drawn from, its evaluation split the test set.

Data (`data=`): the default source works on a fresh clone with network
access (a Hugging Face dataset id) or with none (quickstart, files in the
repo); `data_dir=` reads the same data from local files instead, e.g.
`data=mr,data_dir=../shared/data/senteval_mr` (train.tsv and dev.tsv).
The prompts are LM-BFF's manual ones (Gao et al. 2021, Table 1).
"""

import os

from experiments import _pretrain_common
from research.configs import default

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), ".."))

# name -> data preset. hf: (dataset, config, train split, test split, text
# columns); local: text columns of data_dir/{train,dev}.tsv.
DATASETS = {
    "quickstart": {
        "dir": os.path.join(REPO, "data", "quickstart"), "hf": None,
        "local": ("sentence",), "label_names": ("negative", "positive"),
        "template": "<s1> It was [MASK] .", "verbalizer": "0=terrible,1=great",
        "max_length": 64},
    # MR (Pang and Lee 2005). Local: SentEval's 80/20 split (../shared/data).
    "mr": {
        "dir": "", "hf": ("cornell-movie-review-data/rotten_tomatoes", "",
                          "train", "test", ("text",)),
        "local": ("sentence",), "label_names": (),
        "template": "<s1> It was [MASK] .", "verbalizer": "0=terrible,1=great",
        "max_length": 128},
    # CR (Hu and Liu 2004), as SetFit's hub copy or SentEval's files.
    "cr": {
        "dir": "", "hf": ("SetFit/SentEval-CR", "", "train", "test",
                          ("text",)),
        "local": ("sentence",), "label_names": (),
        "template": "<s1> It was [MASK] .", "verbalizer": "0=terrible,1=great",
        "max_length": 128,
        # SentEval's CR train.tsv has one empty sentence (line 1764): skipped
        # and counted (data.bad_rows), not an error.
        "bad_rows": "skip"},
    # RTE (GLUE): 0 = entailment ("Yes"), 1 = not_entailment ("No").
    "rte": {
        "dir": "", "hf": ("nyu-mll/glue", "rte", "train", "validation",
                          ("sentence1", "sentence2")),
        "local": ("sentence1", "sentence2"), "label_names": (),
        "template": "<s1> ? [MASK] , <s2>", "verbalizer": "0=yes,1=no",
        "max_length": 256},
}

# Every experiment's `arg` keys (each adds its own); the type of the default
# is the value's.
ARG_DEFAULTS = {"data": "quickstart", "data_dir": "", "model":
                "all-minilm-l6-v2", "lr": 0.0, "steps": 0, "batch": 0,
                "max_length": 0, "eval_every": 0}


def parse_arg(arg, defaults, experiment):
  """`_pretrain_common.parse_arg` over ARG_DEFAULTS + `defaults`, and the
  data preset checked."""
  args = _pretrain_common.parse_arg(arg, {**ARG_DEFAULTS, **defaults},
                                    experiment)
  if args["data"] not in DATASETS:
    raise ValueError(f"{experiment}:{arg}: data={args['data']!r}; valid: "
                     f"{', '.join(DATASETS)}")
  return args


def preset(args):
  return DATASETS[args["data"]]


def base_config(args, *, lr, steps, batch, eval_every):
  """The data, model and optimiser of a few-shot run; the task is the
  caller's. `lr`, `steps`, `batch`, `eval_every`: the experiment's
  defaults, which `args` (> 0) override."""
  p = preset(args)
  c = default.get_config()
  c.model.name = args["model"]
  c.num_labels = 2
  directory = args["data_dir"] or p["dir"]
  if directory:
    c.data.source = "local"
    c.data.train_file = os.path.join(directory, "train.tsv")
    c.data.eval_file = os.path.join(directory, "dev.tsv")
    c.data.text_fields = p["local"]
    c.data.bad_rows = p.get("bad_rows", "error")
  else:
    name, hf_config, train_split, test_split, fields = p["hf"]
    c.data.source = "hf"
    c.data.name, c.data.hf_config = name, hf_config
    c.data.train_split, c.data.eval_splits = train_split, (test_split,)
    c.data.text_fields = fields
  c.data.label_field = "label"
  c.data.label_names = p["label_names"]
  c.data.max_length = args["max_length"] or p["max_length"]
  # Few-shot batches are few: two buckets are two compilations. Widths in
  # multiples of 32 repeat across a protocol's splits, so from the second
  # split on the persistent compilation cache has most of them.
  c.data.num_buckets = 2
  c.data.bucket_multiple = 32
  c.batch_size = args["batch"] or batch
  c.eval_batch_size = 32
  c.total_steps = args["steps"] or steps
  c.eval_every_steps = args["eval_every"] or eval_every
  c.optimizer.learning_rate = args["lr"] or lr
  # LM-BFF trains with transformers.Trainer's defaults: linear decay, no
  # warm-up.
  c.optimizer.warmup_proportion = 0.0
  c.optimizer.schedule = "linear"
  c.metrics = ("accuracy",)
  c.eval_metric = "accuracy"
  c.keep_checkpoints = 1
  c.log_every_steps = 10
  # W&B per split would add a process and seconds to every short run; turn
  # it on with --config.wandb.mode=offline (or online).
  c.wandb.mode = "disabled"
  c.wandb.tags = ("fewshot",)
  return c
