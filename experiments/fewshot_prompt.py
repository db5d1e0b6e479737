r"""Few-shot prompt-based fine-tuning on the masked-LM head (LM-BFF, PET).

Each input becomes the data preset's template ("<s1> It was [MASK] .",
RTE: "<s1> ? [MASK] , <s2>") and the label logits are the masked LM's for
the label words (great / terrible, yes / no) at the mask
(research/tasks/prompt.py). The packaged MiniLM has no trained masked-LM
head: restore one first (experiments/mlm_head.py) and pass it as model=.
Training as experiments/fewshot_finetune.py: 60 steps of batch 8, AdamW lr
1e-4 with linear decay, the few-shot dev set every 10 steps, the best
checkpoint tested. With demonstrations, max_length doubles (room for one
example per label) and each training input gets 4 features, each with its
own draw.

    python -m research.train --config experiments/mlm_head.py --workdir /tmp/mlm_head
    python -m research.export --workdir /tmp/mlm_head --out /tmp/mlm_head/hf
    # zero-shot (no training), then prompt-based fine-tuning
    python -m research.fewshot --config experiments/fewshot_prompt.py:model=/tmp/mlm_head/hf \
        --workdir /tmp/fs/quickstart/zero_shot --zero_shot
    python -m research.fewshot --config experiments/fewshot_prompt.py:model=/tmp/mlm_head/hf \
        --workdir /tmp/fs/quickstart/prompt --k 16
    # LM-BFF's demonstrations (by similarity; or demos=random)
    python -m research.fewshot \
        --config experiments/fewshot_prompt.py:data=mr,data_dir=../shared/data/senteval_mr,model=/tmp/mlm_head/hf,demos=similar \
        --workdir /tmp/fs/mr/prompt_demos --k 16

Args: data, data_dir, model, lr, steps, batch, max_length, eval_every (as
experiments/_fewshot_common.py), template and verbalizer (the preset's by
default; "label=word|word,..."), multi_token (first | mean), demos (none |
random | similar), demo_copies (features per training input, each its own
draw), mlm_loss (PET's auxiliary masked-LM weight; 0 off).

Expected result (2026-12-07, 2 CPU cores, K = 16, 5 splits, on the head
that experiments/mlm_head.py restores in 300 steps): **below standard
fine-tuning** on the packaged MiniLM: MR 55.8 ± 3.8 (standard 62.4), CR
59.8 ± 5.6 (standard 73.0, majority 61.9); with demonstrations MR 53.4 ±
2.1 at 2.5x the time. Zero-shot predicts one class (MR 52.1, CR 61.9: the
majority shares): the restored head scores great - terrible at AUC 0.564
on MR, little signal for a prompt to start from (LM-BFF's gains are on
RoBERTa-large's own masked LM). BENCHMARKS.md, "Few-shot and zero-shot".
"""

from experiments import _fewshot_common as common


def get_config(arg=None):
  args = common.parse_arg(
      arg, {"template": "", "verbalizer": "", "multi_token": "first",
            "demos": "none", "demo_copies": 4, "mlm_loss": 0.0},
      "experiments/fewshot_prompt.py")
  c = common.base_config(args, lr=1e-4, steps=60, batch=8, eval_every=10)
  p = common.preset(args)
  c.task = "prompt"
  c.task_options = {
      "template": args["template"] or p["template"],
      "verbalizer": args["verbalizer"] or p["verbalizer"],
      "multi_token": args["multi_token"],
      "demonstrations": args["demos"],
      "demo_copies": args["demo_copies"],
      "mlm_loss": args["mlm_loss"]}
  if args["demos"] != "none" and not args["max_length"]:
    # Room for a demonstration of each label after the prompt.
    c.data.max_length = min(512, 2 * c.data.max_length)
  return c
