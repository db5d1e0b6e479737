r"""GLUE CoLA (acceptability of single sentences): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_cola.py \
        --workdir /tmp/glue/cola
    python -m research.results --workdir /tmp/glue/cola
    python -m research.predict --workdir /tmp/glue/cola/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_cola.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/cola, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Metric: Matthews correlation (official; selects the best checkpoint and run),
accuracy beside it.

Expected (published, not yet measured here): BERT-BASE 52.1, BERT-LARGE 60.5
Matthews corr. x100 on the GLUE TEST set (paper Table 1); bert-base-cased on
DEV 59.04 +- 1.06 (Hugging Face Flax example, 5 seeds).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """CoLA: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("cola", arg, "experiments/glue_cola.py")
  config.data.text_fields = ("sentence",)
  config.data.label_names = ("unacceptable", "acceptable")
  config.num_labels = 2
  config.metrics = ("matthews_corrcoef", "accuracy")
  config.eval_metric = "matthews_corrcoef"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_cola.py")
