r"""SQuAD v1.1: extractive question answering, BERT's recipe.

    python -m research.train --config experiments/squad_v1.py \
        --workdir /tmp/squad_v1
    python -m research.predict --workdir /tmp/squad_v1 --out /tmp/squad_v1_out
    python -m research.metrics.squad dev-v1.1.json \
        /tmp/squad_v1_out/validation/predictions.json

`arg` (experiments/_squad_common.py): model=bert-base-uncased (default),
bert-base-cased, bert-large-uncased, bert-large-cased, all-minilm-l6-v2;
source=tfds (squad/v1.1, default), hf (rajpurkar/squad) or local with
train_file= and eval_file= (the official JSON); max_length=384,
doc_stride=128.

Recipe (paper section 4.2): batch 32, lr 5e-5, 3 epochs, 10% warmup.
Metrics: exact match and F1 of the official v1.1 script (fractions; the
script prints percentages); F1 selects the best checkpoint.

Expected: the paper's numbers (published, not measured here): dev EM 80.8 /
F1 88.5 (BERT-BASE), 84.1 / 90.9 (BERT-LARGE) (Devlin et al. 2018, Table 2).
"""

from experiments import _squad_common as common


def get_config(arg=None):
  """SQuAD v1.1: the shared recipe, 3 epochs at lr 5e-5, batch 32."""
  return common.get_config(
      arg, "experiments/squad_v1.py", tfds_name="squad/v1.1",
      hf_name="rajpurkar/squad", version_2=False, epochs=3,
      learning_rate=5e-5, batch_size=32)
