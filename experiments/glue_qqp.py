r"""GLUE QQP (duplicate question pairs): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_qqp.py \
        --workdir /tmp/glue/qqp
    python -m research.results --workdir /tmp/glue/qqp
    python -m research.predict --workdir /tmp/glue/qqp/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_qqp.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/qqp, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Metrics: F1 of "duplicate" (the paper's number; selects the best checkpoint
and run) and accuracy.

Expected (published, not yet measured here): BERT-BASE 71.2, BERT-LARGE 72.1
F1 on the GLUE TEST set (paper Table 1); bert-base-cased on DEV F1 87.51 +-
0.06, accuracy 90.76 +- 0.05 (Hugging Face Flax example, 5 seeds).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """QQP: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("qqp", arg, "experiments/glue_qqp.py")
  config.data.text_fields = ("question1", "question2")
  config.data.label_names = ("not_duplicate", "duplicate")
  config.num_labels = 2
  config.metrics = ("f1", "accuracy")
  config.eval_metric = "f1"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_qqp.py")
