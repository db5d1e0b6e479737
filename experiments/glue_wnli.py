r"""GLUE WNLI (Winograd-schema entailment): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_wnli.py \
        --workdir /tmp/glue/wnli
    python -m research.results --workdir /tmp/glue/wnli
    python -m research.predict --workdir /tmp/glue/wnli/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_wnli.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/wnli, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Metric: accuracy (official).

Expected (published, not yet measured here): no paper number (the paper leaves
WNLI out); bert-base-cased on DEV 37.01 +- 6.83 (Hugging Face Flax example, 5
seeds, 5 epochs).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """WNLI: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("wnli", arg, "experiments/glue_wnli.py")
  config.data.text_fields = ("sentence1", "sentence2")
  config.data.label_names = ("not_entailment", "entailment")
  config.num_labels = 2
  config.metrics = ("accuracy",)
  config.eval_metric = "accuracy"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_wnli.py")
