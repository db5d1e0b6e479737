r"""GLUE SST-2 (sentiment of movie-review sentences): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_sst2.py \
        --workdir /tmp/glue/sst2
    python -m research.results --workdir /tmp/glue/sst2
    python -m research.predict --workdir /tmp/glue/sst2/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_sst2.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/sst2, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Metric: accuracy (official).

Expected (published, not yet measured here): BERT-BASE 93.5, BERT-LARGE 94.9
accuracy on the GLUE TEST set (paper Table 1); bert-base-cased on DEV 92.23 +-
0.57 (Hugging Face Flax example, 5 seeds).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """SST-2: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("sst2", arg, "experiments/glue_sst2.py")
  config.data.text_fields = ("sentence",)
  config.data.label_names = ("negative", "positive")
  config.num_labels = 2
  config.metrics = ("accuracy",)
  config.eval_metric = "accuracy"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_sst2.py")
