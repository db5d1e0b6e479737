r"""Pre-train a small BERT (4 layers, 128 wide) from scratch on WikiText-2, on CPU.

    python -m research.train --config experiments/pretrain_wikitext.py \
        --workdir /tmp/pretrain_wikitext
    # the same text from local files (wiki.train.tokens, wiki.valid.tokens)
    python -m research.train \
        --config experiments/pretrain_wikitext.py:data_dir=/data/wikitext-2 \
        --workdir /tmp/pretrain_wikitext
    # BERT's recipe, as this experiment ran before (stays at the unigram plateau)
    python -m research.train \
        --config experiments/pretrain_wikitext.py:recipe=bert --workdir /tmp/bert

Masked LM (15%, 80/10/10, dynamic) on WikiText-2's training text (the Hugging
Face dataset Salesforce/wikitext, wikitext-2-v1; or `data_dir=` a folder of
wiki.train.tokens and wiki.valid.tokens, as ../shared/data/wikitext here)
(2.1M words, one paragraph per line, rows of 128 tokens with documents
sharing rows), held-out masked-LM loss, accuracy and perplexity on the first
`eval_rows` rows of `wiki.valid.tokens` every `eval_every` steps. The model
takes all-MiniLM-L6-v2's uncased WordPiece tokenizer (30,522 tokens) and a new
4-layer encoder with 64-wide heads and a 4x FFN (Turc et al. 2019's grid).

Two recipes (`recipe=`):
  cramming (default; Geiping & Goldstein 2023, scaled to a CPU): 128 wide,
    pre-LN, no biases in the encoder's dense layers, sparse prediction (the
    decoder runs on the masked positions only), no dropout, AdamW (b2 0.98,
    eps 1e-12, weight decay 0.01) with peak lr 2e-3, 10% warm-up then cosine
    decay, gradient clipping at 0.5, batch 16, 4,500 steps (about 47
    minutes of CPU time, 25 of wall time, on this repo's 2-core machine:
    the shape and schedule are sized to the budget, as Cramming's are).
  bert (what this experiment was; Devlin et al. 2018's shape of recipe):
    256 wide (BERT-mini), post-LN, biases, dense prediction, dropout 0.1,
    lr 2e-3, 5% warm-up, linear decay, clipping at 1.0, batch 16, 120 steps.
Any field of a recipe can be changed alone (docs/pretraining.md's plateau
diagnosis does): lr, warmup (a proportion), schedule (linear | cosine |
constant), layer_norm (post | pre), bias (on | off), dropout, sparse, clip,
b2, steps, batch, hidden (a multiple of 64).

Expected result (BENCHMARKS.md, "Pre-training and task-adaptive
pre-training"; 2 CPU cores, seed 0, held-out masked-token accuracy on 128
rows): cramming 0.152 at step 3,600 (38.5 CPU minutes, 20.7 wall minutes),
loss 5.78 nats; bert stays at 0.057, the unigram solution (the frequency of
the most common tokens), through step 400 (16 CPU minutes). WikiText-2's
tokenised text keeps `<unk>` and ` @-@ ` markers, which WordPiece splits
into easy-to-predict pieces: compare runs with each other, not with
published BERT perplexities.

Args (`experiments/pretrain_wikitext.py:steps=400,batch=32`): recipe, the
recipe fields above, max_length, eval_every, eval_rows, data_dir, smoke (a
2-layer, 32-wide model, 10 steps: a check that it runs).
"""

from experiments import _pretrain_common as common

RECIPES = {
    "cramming": {"steps": 4500, "batch": 16, "lr": 2e-3, "warmup": 0.1,
                 "schedule": "cosine", "layer_norm": "pre", "bias": "off",
                 "dropout": 0.0, "sparse": True, "clip": 0.5, "b2": 0.98,
                 "eps": 1e-12, "eval_every": 300, "hidden": 128},
    "bert": {"steps": 120, "batch": 16, "lr": 2e-3, "warmup": 0.05,
             "schedule": "linear", "layer_norm": "post", "bias": "on",
             "dropout": 0.1, "sparse": False, "clip": 1.0, "b2": 0.999,
             "eps": 1e-6, "eval_every": 20, "hidden": 256},
}
# A recipe field left at its "unset" value takes the recipe's.
UNSET = {"steps": 0, "batch": 0, "lr": 0.0, "warmup": -1.0, "schedule": "",
         "layer_norm": "", "bias": "", "dropout": -1.0, "sparse": "",
         "clip": -1.0, "b2": 0.0, "eps": 0.0, "eval_every": 0, "hidden": 0}
DEFAULTS = {"recipe": "cramming", **UNSET, "max_length": 128,
            "eval_rows": 128, "smoke": False, "data_dir": ""}


def get_config(arg=None):
  name = "experiments/pretrain_wikitext.py"
  args = common.parse_arg(arg, DEFAULTS, name)
  if args["recipe"] not in RECIPES:
    raise ValueError(f"{name}:{arg}: recipe={args['recipe']!r}; valid: "
                     f"{', '.join(RECIPES)}")
  r = {k: (RECIPES[args["recipe"]][k] if args[k] == UNSET[k] else args[k])
       for k in UNSET}
  if isinstance(r["sparse"], str):  # sparse=1 | 0 | true | false
    if r["sparse"].lower() not in ("1", "0", "true", "false"):
      raise ValueError(f"{name}:{arg}: sparse={r['sparse']!r}; valid: 1, 0")
    r["sparse"] = r["sparse"].lower() in ("1", "true")
  if r["hidden"] <= 0 or r["hidden"] % 64:
    raise ValueError(f"{name}:{arg}: hidden={r['hidden']}; valid: a positive "
                     "multiple of 64 (64-wide attention heads)")
  if args["smoke"]:
    r.update(steps=10, eval_every=5)
    args.update(eval_rows=64)
  c = common.corpus_config(
      model="all-minilm-l6-v2",
      train_files=(), eval_files=(),
      architecture=(common.TINY if args["smoke"]
                    else common.encoder(r["hidden"])),
      max_length=args["max_length"], batch_size=r["batch"],
      total_steps=r["steps"], learning_rate=r["lr"],
      eval_rows=args["eval_rows"])
  common.use_wikitext(c, args["data_dir"])
  c.optimizer.warmup_proportion = r["warmup"]
  c.optimizer.schedule = r["schedule"]
  c.optimizer.grad_clip_norm = r["clip"]
  c.optimizer.b2 = r["b2"]
  c.optimizer.eps = r["eps"]
  c.model.layer_norm = r["layer_norm"]
  c.model.bias = r["bias"]
  c.model.hidden_dropout = r["dropout"]
  c.model.attention_dropout = r["dropout"]
  c.task_options.sparse_prediction = r["sparse"]
  c.eval_every_steps = r["eval_every"]
  c.log_every_steps = 10
  c.keep_checkpoints = 1
  return c
