r"""GLUE RTE (two-way entailment): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_rte.py \
        --workdir /tmp/glue/rte
    python -m research.results --workdir /tmp/glue/rte
    python -m research.predict --workdir /tmp/glue/rte/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_rte.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/rte, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Metric: accuracy (official).

Expected (published, not yet measured here): BERT-BASE 66.4, BERT-LARGE 70.1
accuracy on the GLUE TEST set (paper Table 1); bert-base-cased on DEV 64.76 +-
1.04 (Hugging Face Flax example, 5 seeds).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """RTE: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("rte", arg, "experiments/glue_rte.py")
  config.data.text_fields = ("sentence1", "sentence2")
  config.data.label_names = ("entailment", "not_entailment")
  config.num_labels = 2
  config.metrics = ("accuracy",)
  config.eval_metric = "accuracy"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_rte.py")
