r"""Distillation: the fine-tuned MiniLM-L6 teaches a 3-layer student.

Four commands per task (here MR; `data=` quickstart | mr | rte | cola |
conll): fine-tune the teacher, make the student from its pre-trained layers
2, 4 and 6 (DistilBERT's one in two), then train the student with and
without the teacher:

    python -m research.train --config experiments/distill.py:data=mr,role=teacher \
        --workdir /tmp/distill/mr/teacher
    python -m research.methods.distillation.student --teacher all-minilm-l6-v2 \
        --layers 2,4,6 --out /tmp/distill/student_l3
    python -m research.train --config experiments/distill.py:data=mr,role=student,\
student=/tmp/distill/student_l3 --workdir /tmp/distill/mr/student
    python -m research.train --config experiments/distill.py:data=mr,role=distill,\
student=/tmp/distill/student_l3,teacher=/tmp/distill/mr/teacher \
        --workdir /tmp/distill/mr/distill

`arg` (key=value, comma-separated): data (default quickstart), role=teacher
(the packaged all-MiniLM-L6-v2 fine-tuned: 6 layers, 384 wide, 22.7M
parameters) | student (the student alone, the task's loss) | distill (the
student taught by `teacher=`, a workdir of role=teacher), student= (the
student's directory), seed=N, data_dir= (local files instead of the default
download: ../shared/data/senteval_mr, glue_rte, glue_cola, conll2003) and
the distillation's settings: T= (2.0), soft= (1.0), hard= (0.5), hidden=
(0.0), attention= (0.0), logits=cache (the teacher's outputs computed once
per training example) | fly, and copies= (0): the augment method's EDA
copies of each training example, made once, as TinyBERT's transfer data
(with role=student: the same data, no teacher). The defaults are soft
targets at T = 2 plus half the hard loss, cached.

Data (the default needs no local file): quickstart: the repository's
review set; mr: Hugging Face `cornell-movie-review-data/rotten_tomatoes`
(Pang & Lee's sentence polarity, its own train/validation split), or with
data_dir= SentEval's MR as TSV (label, sentence: ../shared/data/senteval_mr,
an 80/20 split); rte, cola: TFDS glue/<task> or data_dir= GLUE TSVs; conll:
TFDS conll2003 or data_dir= a folder of train.txt and valid.txt (CoNLL
columns), 1 epoch. Recipes: quickstart's (batch 16, lr 2e-4, 3 epochs),
and BERT's GLUE recipe on MiniLM (batch 32, lr 1e-4, 3 epochs, 10% warm-up;
experiments/_glue_minilm.py) for the rest, every role alike.

Expected (BENCHMARKS.md "Compression: distillation, int8 and pruning", 2 CPU
cores, 2026-12-07; teachers: experiments/compression.py's fp32 runs):
quickstart, 3 seeds: student alone 0.810 ± 0.026, the defaults 0.810 ±
0.026 (no gain), with hidden=1.0,attention=1.0,logits=fly (TinyBERT's
intermediate losses) 0.853 ± 0.012, teacher 0.917 ± 0.015; MR, 3 seeds:
student 0.816 ± 0.005, the defaults 0.816 ± 0.004, with the TinyBERT losses
0.829 ± 0.005 (97.8% of the teachers' 0.848 ± 0.005), 2.0x faster.
"""

import os

from experiments import _glue_minilm as glue
from experiments import conll2003
from experiments import quickstart
from research import methods
from research.configs.args import parse_arg

DATA = ("quickstart", "mr", "rte", "cola", "conll")
ROLES = ("teacher", "student", "distill")
ARGS = {"data": "quickstart", "role": "teacher", "student": "", "teacher": "",
        "seed": 0, "data_dir": "", "T": 2.0, "soft": 1.0, "hard": 0.5,
        "hidden": 0.0, "attention": 0.0, "logits": "cache", "copies": 0}
MR_HF = "cornell-movie-review-data/rotten_tomatoes"


def _mr(data_dir):
  config = glue.get_config("cola", max_length=64)  # the GLUE recipe
  if data_dir:
    config.data.source = "local"
    config.data.train_file = os.path.join(data_dir, "train.tsv")
    config.data.eval_file = os.path.join(data_dir, "dev.tsv")
    config.data.text_fields = ("sentence",)
  else:
    config.data.source, config.data.name = "hf", MR_HF
    config.data.hf_config = ""
    config.data.eval_splits = ("validation",)
    config.data.text_fields = ("text",)
  config.data.label_field = "label"
  config.metrics = ("accuracy",)
  config.eval_metric = "accuracy"
  return config


def _conll(data_dir):
  if data_dir:
    arg = (f"model=all-minilm-l6-v2,source=local,"
           f"train_file={os.path.join(data_dir, 'train.txt')},"
           f"eval_file={os.path.join(data_dir, 'valid.txt')}")
  else:
    arg = "model=all-minilm-l6-v2"
  config = conll2003.get_config(arg)
  config.optimizer.learning_rate = 1e-4  # the MiniLM's, as the others
  config.num_epochs = 1.0  # 2 CPU cores: one epoch (conll2003.py: F1 0.876)
  config.keep_checkpoints = 1
  return config


# Few padded lengths (each is a compilation of the train and eval steps, a
# minute on 2 shared CPU cores): about 85% of the tokens real.
BUCKETS = {"quickstart": (14, 17, 20, 45, 64), "mr": (24, 32, 48, 64),
           "cola": (16, 32, 64), "rte": (64, 96, 128), "conll": (32, 64, 128)}


def _task(args):
  if args.data == "quickstart":
    config = quickstart.get_config()
  elif args.data == "mr":
    config = _mr(args.data_dir)
  elif args.data == "conll":
    config = _conll(args.data_dir)
  else:
    config = glue.get_config(args.data, args.data_dir,
                             max_length=64 if args.data == "cola" else 128)
    config.data.label_names = (("unacceptable", "acceptable")
                               if args.data == "cola"
                               else ("entailment", "not_entailment"))
  config.data.buckets = BUCKETS[args.data]
  return config


def get_config(arg=None):
  """`arg`: data=..., role=..., student=, teacher= (see the docstring)."""
  args = parse_arg(arg, ARGS, "experiments/distill.py",
                   {"data": DATA, "role": ROLES,
                    "logits": ("cache", "fly")})
  config = _task(args)
  config.seed = args.seed
  config.wandb.mode = "disabled"
  if args.role == "teacher":
    return config
  if not args.student:
    raise ValueError(
        f"experiments/distill.py: role={args.role} needs student= the "
        "student's directory (python -m "
        "research.methods.distillation.student --teacher all-minilm-l6-v2 "
        "--layers 2,4,6 --out DIR)")
  config.model.name = args.student
  names, options = (), {}
  if args.copies:  # the same transfer data with or without the teacher
    names = ("augment",)
    options["augment"] = methods.with_defaults(
        "augment", copies=args.copies, regenerate="once")
  if args.role == "distill":
    if not args.teacher:
      raise ValueError("experiments/distill.py: role=distill needs teacher= "
                       "the workdir of a role=teacher run")
    names += ("distill",)
    options["distill"] = methods.with_defaults(
        "distill", teacher=args.teacher, temperature=args.T, soft=args.soft,
        hard=args.hard, hidden=args.hidden, attention=args.attention,
        teacher_logits=args.logits)
  config.methods = names
  config.method_options = options
  return config
