r"""Pre-train a small BERT (4 layers, 256 wide) from scratch on WikiText-2, on CPU.

    nice -n 10 python -m research.train --config experiments/pretrain_wikitext.py \
        --workdir /tmp/pretrain_wikitext

Masked LM (15%, 80/10/10, dynamic) on `../shared/data/wikitext/wiki.train.tokens`
(2.1M words, one paragraph per line, rows of 128 tokens with documents
sharing rows), held-out masked-LM loss, accuracy and perplexity on the first
`eval_rows` rows of `wiki.valid.tokens` every `eval_every` steps. The model
takes all-MiniLM-L6-v2's uncased WordPiece tokenizer (30,522 tokens) and a new
4-layer, 256-wide encoder (BERT-mini's shape); AdamW, lr 2e-3, 5% warmup,
linear decay, batch 16, 120 steps.

Expected result (BENCHMARKS.md, "Pre-training and task-adaptive pre-training"; measured on 2 shared CPU
cores, ~20 min): the held-out loss falls at every evaluation, from 10.39 nats
at initialisation (perplexity 32,485) to 6.64 (perplexity 764) at step 120;
masked-token accuracy 0.057: in this budget the model learns the token
frequencies. WikiText-2's tokenised text keeps `<unk>` and ` @-@ ` markers,
which WordPiece splits into easy-to-predict pieces: compare runs with each
other, not with published BERT perplexities.

Args (`experiments/pretrain_wikitext.py:steps=400,batch=32`): steps, batch,
lr, max_length, eval_every, eval_rows, smoke (a 2-layer, 32-wide model, 10
steps: a check that it runs).
"""

import os

from experiments import _pretrain_common as common

DEFAULTS = {"steps": 120, "batch": 16, "lr": 2e-3, "max_length": 128,
            "eval_every": 20, "eval_rows": 128, "smoke": False}


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS, "experiments/pretrain_wikitext.py")
  if args["smoke"]:
    args.update(steps=10, eval_every=5, eval_rows=64)
  c = common.corpus_config(
      model="all-minilm-l6-v2",
      train_files=(os.path.join(common.WIKITEXT, "wiki.train.tokens"),),
      eval_files=(os.path.join(common.WIKITEXT, "wiki.valid.tokens"),),
      architecture=common.TINY if args["smoke"] else common.SMALL,
      max_length=args["max_length"], batch_size=args["batch"],
      total_steps=args["steps"], learning_rate=args["lr"],
      eval_rows=args["eval_rows"])
  c.optimizer.warmup_proportion = 0.05
  c.model.hidden_dropout = 0.1
  c.model.attention_dropout = 0.1
  c.eval_every_steps = args["eval_every"]
  c.log_every_steps = 10
  c.keep_checkpoints = 1
  return c
