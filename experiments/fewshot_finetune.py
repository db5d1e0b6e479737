r"""Few-shot standard fine-tuning: BERT's classifier on the pooled [CLS].

LM-BFF's "fine-tuning" baseline (Gao et al. 2021, Table 3): the K-shot
training set through the sequence-classification head (a new classifier on
BERT's pooler; the packaged MiniLM's pooler was never trained), 60 steps of
batch 8 (15 epochs of 2 x 16 examples), AdamW lr 1e-4 with linear decay and
no warm-up, the few-shot dev set evaluated every 10 steps and the best
checkpoint tested (LM-BFF: 1,000 steps, lr and batch chosen per split from a
grid; a CPU budget here: the training loss is ~0.005 by step 60 and the best
dev step came before it on the splits checked). Run through the protocol:

    python -m research.fewshot --config experiments/fewshot_finetune.py \
        --workdir /tmp/fs/quickstart/finetune --k 16
    python -m research.fewshot \
        --config experiments/fewshot_finetune.py:data=mr,data_dir=../shared/data/senteval_mr \
        --workdir /tmp/fs/mr/finetune --k 16
    # the full-data reference: the whole training set, 1 epoch, seeds 13, 21
    python -m research.fewshot \
        --config experiments/fewshot_finetune.py:data=mr,data_dir=../shared/data/senteval_mr,full=true \
        --workdir /tmp/fs/mr/full --k 0 --seeds 13,21

Args: data (quickstart | mr | cr | rte), data_dir (local train.tsv and
dev.tsv instead of the Hugging Face copy), model, lr, steps, batch,
max_length, eval_every, full (the full-data recipe: batch 32, 1 epoch,
lr 1e-4, linear decay with 10% warm-up).

Expected result (2026-12-07, 2 CPU cores, K = 16, LM-BFF's 5 split seeds,
test accuracy mean ± std): MR 62.4 ± 3.9 (majority 52.1), CR 73.0 ± 4.0
(majority 61.9); about 50 s a split. K = 8: MR 58.4 ± 5.7, CR 70.0 ± 6.1.
Full data (`full=true`, 5 seeds): MR 82.9 ± 0.5 (206 s a run), CR 90.0 ±
0.5 (87 s) (BENCHMARKS.md, "Few-shot and zero-shot").
"""

from experiments import _fewshot_common as common


def get_config(arg=None):
  args = common.parse_arg(arg, {"full": False},
                          "experiments/fewshot_finetune.py")
  if args["full"]:
    c = common.base_config(args, lr=1e-4, steps=0, batch=32, eval_every=0)
    c.total_steps = args["steps"] or -1
    c.num_epochs = 1.0
    c.optimizer.warmup_proportion = 0.1
    c.data.num_buckets = -1  # the platform's default: a real epoch
  else:
    c = common.base_config(args, lr=1e-4, steps=60, batch=8, eval_every=10)
  c.task = "sequence_classification"
  return c
