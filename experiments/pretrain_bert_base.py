r"""BERT-base from scratch, the paper's recipe, on a TPU pod with FSDP.

Devlin et al. (2018), appendix A.2: masked LM (15%, 80/10/10) and
next-sentence prediction, phase 1 on rows of 128 tokens for 90% of the
steps, phase 2 on rows of 512 for the rest, batch 256, Adam (lr 1e-4,
weight decay 0.01), warmup 10k steps then linear decay. `optimizer=lamb`
is You et al. (2020)'s large-batch variant (LAMB, batch 65536 / 32768 in
their recipe; here the global batch is the `batch` arg).

    # Phase 1: 128 tokens (a TPU v4-32 pod slice; launch.sh runs it on all
    # hosts; the text files must be on every host)
    ./launch.sh tpu --name my-v4-32 --zone us-central2-b \
        "experiments/pretrain_bert_base.py:phase=1,files=/data/books/*.txt;/data/wiki/*.txt,eval=/data/heldout.txt" \
        --workdir gs://my-bucket/bert_base_p1
    # Phase 2: 512 tokens, from phase 1's weights, exported into the code
    # folder that launch.sh copies to every host
    python -m research.export --workdir gs://my-bucket/bert_base_p1 --out exports/bert_base_p1
    ./launch.sh tpu --name my-v4-32 --zone us-central2-b \
        "experiments/pretrain_bert_base.py:phase=2,init=exports/bert_base_p1,files=/data/books/*.txt;/data/wiki/*.txt,eval=/data/heldout.txt" \
        --workdir gs://my-bucket/bert_base_p2

(tests/test_pretraining.py runs both launch.sh commands as written with
`--dry-run`.)

Parallelism: `parallelism.mesh_shape = (1, -1, 1)`: every chip is on the
`fsdp` axis (parameters, gradients and Adam moments sharded by their `embed`
axis, ZeRO-3 style; the batch is split over `data` x `fsdp`); `mesh=` takes
another (data, fsdp, tensor) shape, e.g. `mesh=4x8x1`. bfloat16 compute,
float32 master weights. Each host tokenises the corpus once into its local
`corpus_dir` (the rows are the same everywhere) and reads its own rows of
every global batch (`research.data.corpus`); grain's iterator position is in
every checkpoint, so a preempted pod resumes at the same example.

Expected result: not run here (no pod). The recipe validates, and its
`tiny` version (a 2-layer, 32-wide model, 8 simulated CPU devices) trains
with the same losses on an FSDP mesh as on one device
(tests/test_pretraining.py).

Args: phase (1 | 2), files, eval (";"-separated files or globs), init (phase
2: the exported phase-1 model), optimizer (adamw | lamb), batch (global),
steps (this phase's; default 900k / 100k), lr, warmup, mesh ("DxFxT"), nsp,
tiny (the test's model and sizes).
"""

import os

from experiments import _pretrain_common as common

BERT_BASE = ("hidden_size=768,num_hidden_layers=12,num_attention_heads=12,"
             "intermediate_size=3072,max_position_embeddings=512,"
             "type_vocab_size=2")
# The corpus defaults to WikiText-2 (the Hugging Face dataset; data_dir= a
# local copy) as a stand-in: pass yours with files= and eval=.
DEFAULTS = {"phase": 1, "files": "", "eval": "", "data_dir": "", "init": "", "optimizer":
            "adamw", "batch": 256, "steps": 0, "lr": 1e-4, "warmup": 10000,
            "mesh": "1x-1x1", "nsp": True, "tiny": False}
PHASES = {1: (128, 900_000), 2: (512, 100_000)}  # row length, steps
OPTIMIZERS = ("adamw", "lamb")


def get_config(arg=None):
  name = "experiments/pretrain_bert_base.py"
  args = common.parse_arg(arg, DEFAULTS, name)
  if args["phase"] not in PHASES:
    raise ValueError(f"{name}:{arg}: phase={args['phase']}; valid: 1, 2")
  if args["optimizer"] not in OPTIMIZERS:
    raise ValueError(f"{name}:{arg}: optimizer={args['optimizer']!r}; valid: "
                     f"{', '.join(OPTIMIZERS)}")
  try:
    mesh = tuple(int(x) for x in args["mesh"].split("x"))
  except ValueError:
    mesh = ()
  if len(mesh) != 3:
    raise ValueError(f"{name}:{arg}: mesh={args['mesh']!r}: give "
                     "data x fsdp x tensor, e.g. 1x-1x1 or 4x8x1")
  if args["phase"] == 2 and not args["init"] and not args["tiny"]:
    raise ValueError(f"{name}:{arg}: phase=2 starts from phase 1: set init= "
                     "to its exported model (python -m research.export)")
  max_length, steps = PHASES[args["phase"]]
  if args["tiny"]:
    max_length, steps = max_length // 4, 4
  # Phase 1 is a new model (the tokenizer and config.json of bert-base-uncased);
  # phase 2 continues phase 1's weights.
  scratch = args["phase"] == 1
  c = common.corpus_config(
      model=args["init"] or ("all-minilm-l6-v2" if args["tiny"]
                             else "google-bert/bert-base-uncased"),
      train_files=common.files(args["files"]),
      eval_files=common.files(args["eval"]), max_length=max_length,
      batch_size=args["batch"], total_steps=args["steps"] or steps,
      learning_rate=args["lr"],
      warmup_steps=min(args["warmup"], (args["steps"] or steps) - 1),
      architecture=(common.TINY if args["tiny"] else BERT_BASE) if scratch
      else "", next_sentence=args["nsp"], packing="doc", eval_rows=10_000)
  if not args["files"]:
    common.use_wikitext(c, args["data_dir"])
  c.optimizer.name = args["optimizer"]
  c.optimizer.b2 = 0.999
  c.model.hidden_dropout = 0.1
  c.model.attention_dropout = 0.1
  c.parallelism.mesh_shape = mesh
  if args["tiny"]:
    c.log_every_steps = 1
  else:
    # Each host's own disk (the workdir may be a bucket; the rows are the
    # same on every host).
    c.task_options.corpus_dir = os.path.expanduser(
        "~/.cache/research_bert/corpus")
    c.model.dtype = "bfloat16"
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 2_000
    c.log_every_steps = 100
  c.wandb.tags = ("pretraining", "bert-base", f"phase{args['phase']}")
  return c
