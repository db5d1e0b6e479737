r"""GLUE STS-B (similarity of sentence pairs, 0 to 5): the BERT paper's recipe.

    python -m research.sweep --config experiments/glue_stsb.py \
        --workdir /tmp/glue/stsb
    python -m research.results --workdir /tmp/glue/stsb
    python -m research.predict --workdir /tmp/glue/stsb/BEST_RUN \
        --out /tmp/glue_test

The sweep runs the paper's 4 learning rates x 5 seeds; `python -m
research.train --config experiments/glue_stsb.py --workdir DIR` runs one (lr
2e-5); research.results names the best run (BEST_RUN). `arg`:
model=bert-base-uncased (default), bert-base-cased, bert-large-uncased,
bert-large-cased; source=tfds (glue/stsb, default) or hf (nyu-mll/glue);
seeds=N; grid=lr|full (experiments/_glue_common.py).

Regression (num_labels=1, squared error). Metrics: Pearson and Spearman;
Spearman, the paper's Table 1 number, selects the best checkpoint and run.

Expected (published, not yet measured here): BERT-BASE 85.8, BERT-LARGE 86.5
Spearman x100 on the GLUE TEST set (paper Table 1); bert-base-cased on DEV
Pearson 88.94 +- 0.07, Spearman 88.63 +- 0.07 (Hugging Face Flax example, 5
seeds).
"""

from experiments import _glue_common as glue


def get_config(arg=None):
  """STS-B: the shared recipe plus its columns, labels and metrics."""
  config = glue.get_config("stsb", arg, "experiments/glue_stsb.py")
  config.data.text_fields = ("sentence1", "sentence2")
  config.num_labels = 1
  config.metrics = ("pearson", "spearman")
  config.eval_metric = "spearman"
  return config


def get_sweep(arg=None):
  """The paper's learning rates x seeds, for research.sweep."""
  return glue.get_sweep(arg, "experiments/glue_stsb.py")
