r"""GLUE MNLI (three-way entailment): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_mnli.py \
        --workdir /tmp/glue/mnli
    python -m research.results --workdir /tmp/glue/mnli
    python -m research.predict --workdir /tmp/glue/mnli/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_mnli.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/mnli, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Metric: accuracy on both dev sets (eval/validation_matched/accuracy,
eval/validation_mismatched/accuracy); matched selects the best checkpoint and
run. research.predict also writes AX.tsv (the diagnostic set) with this model.

Expected (published, not yet measured here): BERT-BASE 84.6/83.4, BERT-LARGE
86.7/85.9 accuracy matched/mismatched on the GLUE TEST set (paper Table 1);
bert-base-cased on DEV matched 83.80 +- 0.16 (Hugging Face Flax example, 5
seeds).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """MNLI: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("mnli", arg, "experiments/glue_mnli.py")
  config.data.text_fields = ("premise", "hypothesis")
  config.data.label_names = ("entailment", "neutral", "contradiction")
  config.num_labels = 3
  config.data.eval_splits = ("validation_matched", "validation_mismatched")
  config.metrics = ("accuracy",)
  config.eval_metric = "accuracy"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_mnli.py")
