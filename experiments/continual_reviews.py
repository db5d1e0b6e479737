r"""Continual learning from feedback: movie reviews (MR) -> product reviews (CR).

The packaged MiniLM is fine-tuned on MR for one epoch (the deployed model:
the MiniLM recipe of experiments/_glue_minilm.py, max length 64), then learns
from rounds of 100 labelled CR sentences sent back as feedback, by one of
five methods, scored after every round on MR dev (what it may forget) and
CR dev (what it should gain). `data_dir` holds senteval_mr/ and senteval_cr/
(e.g. ../shared/data); MR and CR have no TFDS or hub copy here.

    # the deployed model
    python -m research.train \
        --config experiments/continual_reviews.py:data_dir=../shared/data \
        --workdir /tmp/cl/base
    # serve it; /feedback corrections land in /tmp/cl/base/feedback.db
    python -m research.serve --workdir /tmp/cl/base
    # rounds from that feedback store (benchmarks/continual_stream.py fills
    # one through the serving engine), here with experience replay
    python -m research.continual \
        --config experiments/continual_reviews.py:data_dir=../shared/data,method=replay,base=/tmp/cl/base,feedback_db=sqlite:////tmp/cl/base/feedback.db,registry=/tmp/cl/registry \
        --workdir /tmp/cl/replay

Methods (`method`): naive (fine-tune on the feedback alone), replay (as many
MR training examples from a reservoir as new ones), ewc (Fisher from the
reservoir's first 256 examples, weight 10), l2_sp (weight 10), lora (a new rank-8 adapter per
round, folded in on export). Each round: 3 epochs, batch 16, learning rate
5e-5, the candidate always promoted (`promote=always`: the study of
forgetting; the gate's decision is still recorded).

Expected result: the table in BENCHMARKS.md ("Continual learning"), made by
benchmarks/continual_stream.py (3 seeds).
"""

import os

from experiments import _glue_minilm
from research.configs.args import parse_arg

# method -> (config.methods, method_options, replay_ratio)
METHODS = {
    "naive": ((), {}, 0.0),
    "replay": ((), {}, 1.0),
    "ewc": (("ewc",), {"ewc": {"weight": 10.0, "fisher_file": "{replay}",
                               "fisher_examples": 256, "chunk_size": 8}},
            0.0),
    "l2_sp": (("l2_sp",), {"l2_sp": {"weight": 10.0}}, 0.0),
    "lora": (("lora",), {"lora": {"r": 8, "alpha": 16.0}}, 0.0),
}
DEFAULTS = {"data_dir": "", "method": "naive", "base": "", "feedback_db": "",
            "registry": "", "weight": -1.0, "rounds": 5, "round_size": 100,
            "seed": 0}


def get_config(arg=None):
  """`arg`: data_dir (required), method, base, feedback_db, registry
  (default: <feedback db's folder>/registry_<method>_<seed>), weight (the
  ewc / l2_sp weight, < 0: the default), rounds, round_size, seed."""
  args = parse_arg(arg, DEFAULTS, "experiments/continual_reviews.py",
                   choices={"method": tuple(METHODS)})
  data_dir = args.data_dir or "/path/to/shared/data"  # validated when run
  config = _glue_minilm.get_config(
      "mr", os.path.join(data_dir, "senteval_mr"), max_length=64)
  config.seed = args.seed
  config.keep_checkpoints = 1
  # Fixed padded lengths: every round (each with other sentences) trains
  # and scores the same shapes, compiled once (the persistent cache), where
  # lengths chosen from each round's data would compile anew every round.
  config.data.buckets = (24, 40, 64)
  config.num_epochs = 1.0  # the deployed model: one epoch of MR
  methods, options, replay = METHODS[args.method]
  c = config.continual
  c.base = args.base
  c.feedback_db = args.feedback_db
  registry = args.registry
  if not registry and args.feedback_db.startswith("sqlite:///"):
    registry = os.path.join(
        os.path.dirname(args.feedback_db[len("sqlite:///"):]),
        f"registry_{args.method}_{args.seed}")
  c.registry = registry
  c.rounds = args.rounds
  c.round_size = args.round_size
  c.replay_ratio = replay
  c.replay_capacity = 2000
  c.old_eval_file = os.path.join(data_dir, "senteval_mr", "dev.tsv")
  c.new_eval_file = os.path.join(data_dir, "senteval_cr", "dev.tsv")
  c.promote = "always"
  if c.base:  # a stream: the rounds' training recipe
    config.methods = methods
    config.method_options = {k: dict(v) for k, v in options.items()}
    if args.weight >= 0 and methods and "weight" in options[methods[0]]:
      config.method_options[methods[0]]["weight"] = args.weight
    config.num_epochs = 3.0
    config.eval_every_steps = 1_000_000  # score each round once, at its end
    config.batch_size = 16
    config.optimizer.learning_rate = 5e-5
  return config
