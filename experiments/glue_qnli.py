r"""GLUE QNLI (does the sentence answer the question): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_qnli.py \
        --workdir /tmp/glue/qnli
    python -m research.results --workdir /tmp/glue/qnli
    python -m research.predict --workdir /tmp/glue/qnli/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_qnli.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/qnli, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Metric: accuracy (official).

Expected (published, not yet measured here): BERT-BASE 90.5, BERT-LARGE 92.7
accuracy on the GLUE TEST set (paper Table 1); bert-base-cased on DEV 90.82 +-
0.17 (Hugging Face Flax example, 5 seeds).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """QNLI: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("qnli", arg, "experiments/glue_qnli.py")
  config.data.text_fields = ("question", "sentence")
  config.data.label_names = ("entailment", "not_entailment")
  config.num_labels = 2
  config.metrics = ("accuracy",)
  config.eval_metric = "accuracy"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_qnli.py")
