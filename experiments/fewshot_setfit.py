r"""SetFit-style few-shot learning in JAX: contrastive pairs, then a logistic head.

Tunstall et al. (2022) with the `setfit` package's defaults (1.2):
positive and negative pairs of the K-shot sentences balanced by
oversampling, CosineSimilarityLoss on mean-pooled embeddings, 1 epoch,
batch 16, AdamW lr 2e-5 with 10% linear warm-up then linear decay; then
scikit-learn's LogisticRegression on the L2-normalised embeddings
(research/tasks/contrastive.py, research/evaluators/embedding_probe.py).
As setfit, no model selection: one evaluation, at the end, so the protocol
evaluates the test set in the training run (`protocol.selects`) and the
few-shot dev set goes unused.

    python -m research.fewshot --config experiments/fewshot_setfit.py \
        --workdir /tmp/fs/quickstart/setfit --k 16
    python -m research.fewshot \
        --config experiments/fewshot_setfit.py:data=cr,data_dir=../shared/data/senteval_cr \
        --workdir /tmp/fs/cr/setfit --k 8
    # the setfit package itself on the same splits (PyTorch)
    python benchmarks/setfit_baseline.py --splits /tmp/fs/cr/setfit --k 8 \
        --workdir /tmp/fs/cr/setfit_package

Args: data, data_dir, model, lr, batch, max_length (as
experiments/_fewshot_common.py), epochs (over the pairs), sampling
(oversampling | undersampling | unique), num_iterations (> 0: pairs per
sentence, SetFit's first releases).

Expected result (2026-12-07, 2 CPU cores, K = 16, 5 splits, test accuracy):
MR 62.6 ± 1.2 against the setfit package's 62.9 ± 1.4 on the same splits,
CR 74.3 ± 4.4 against 74.1 ± 4.2 (standard fine-tuning 62.4 / 73.0); a
split takes 42.5 s on MR and 34.7 s on CR (the first, with a cold
compilation cache, 50-53 s) against the package's 38.8 and 30.9 s
(BENCHMARKS.md, "Few-shot and zero-shot").
"""

from experiments import _fewshot_common as common


def get_config(arg=None):
  args = common.parse_arg(
      arg, {"epochs": 1.0, "sampling": "oversampling", "num_iterations": 0},
      "experiments/fewshot_setfit.py")
  c = common.base_config(args, lr=2e-5, steps=0, batch=16, eval_every=0)
  c.task = "contrastive"
  c.task_options = {"sampling": args["sampling"],
                    "num_iterations": args["num_iterations"]}
  c.total_steps = args["steps"] or -1
  c.num_epochs = args["epochs"]
  c.optimizer.warmup_proportion = 0.1  # sentence-transformers' warm-up
  c.eval_every_steps = 1 << 30  # one evaluation, at the end (setfit's)
  return c
