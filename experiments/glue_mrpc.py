r"""GLUE MRPC (paraphrase pairs): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_mrpc.py \
        --workdir /tmp/glue/mrpc
    python -m research.results --workdir /tmp/glue/mrpc
    python -m research.predict --workdir /tmp/glue/mrpc/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_mrpc.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/mrpc, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Metrics: F1 of "equivalent" (the paper's number; selects the best checkpoint
and run) and accuracy.

Expected (published, not yet measured here): BERT-BASE 88.9, BERT-LARGE 89.3
F1 on the GLUE TEST set (paper Table 1); bert-base-cased on DEV F1 88.97 +-
0.72, accuracy 84.36 +- 1.09 (Hugging Face Flax example, 5 seeds, 5 epochs).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """MRPC: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("mrpc", arg, "experiments/glue_mrpc.py")
  config.data.text_fields = ("sentence1", "sentence2")
  config.data.label_names = ("not_equivalent", "equivalent")
  config.num_labels = 2
  config.metrics = ("f1", "accuracy")
  config.eval_metric = "f1"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_mrpc.py")
