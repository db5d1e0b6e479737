r"""SQuAD v2.0: extractive QA with unanswerable questions, BERT's recipe.

    python -m research.train --config experiments/squad_v2.py \
        --workdir /tmp/squad_v2
    python -m research.predict --workdir /tmp/squad_v2 --out /tmp/squad_v2_out
    python -m research.metrics.squad dev-v2.0.json \
        /tmp/squad_v2_out/validation/predictions.json \
        --null_odds /tmp/squad_v2_out/validation/null_odds.json

`arg` (experiments/_squad_common.py): model=, source=tfds (squad/v2.0,
default), hf (rajpurkar/squad_v2) or local with train_file= and
eval_file=; max_length=384, doc_stride=128.

A question is answered "" (no answer) when its null odds (the [CLS] score
minus the best span's) exceed a threshold; the evaluator reports F1 at 0
and at the threshold best on dev (`best_f1`, `best_null_threshold`), and
research.predict writes dev predictions at that threshold
(`--null_threshold` for other data).

Recipe (paper section 4.3): lr 5e-5, 2 epochs, batch 48, 10% warmup.
Metrics: the official v2.0 script's exact / F1, HasAns and NoAns splits,
best_exact / best_f1 (fractions); best_f1 selects the best checkpoint.

Expected: the paper's number (published, not measured here): BERT-LARGE
test EM 80.0 / F1 83.1 (Devlin et al. 2018, Table 3). Measured here (2
shared CPU cores; BENCHMARKS.md "SQuAD"): all-minilm-l6-v2 on
the shared 10-article subset, split by article: dev = article 5
(Spectre_(2015_film): 462 questions, 188 unanswerable), train = the other 9
(4,257 questions, 160 unanswerable):

    python -m research.data.squad \
        ../shared/data/squad/train-v2.0_first10articles.json /tmp/squad10 \
        --dev_articles 5
    python -m research.train --config experiments/squad_v2.py:\
model=all-minilm-l6-v2,source=local,\
train_file=/tmp/squad10/train-v2.0_first10articles-train.json,\
eval_file=/tmp/squad10/train-v2.0_first10articles-dev.json,\
max_length=256,doc_stride=64 \
        --config.optimizer.learning_rate=1e-4 --config.batch_size=16 \
        --config.total_steps=300 --config.data.num_buckets=4 \
        --config.cpu_malloc=default --workdir /tmp/squad_minilm

(about one epoch, lengths shortened for the CPU) gave dev EM 28.4 / F1 34.6
at threshold 0 (HasAns EM 42.0 / F1 52.5) and EM 42.0 / F1 44.5 at the
threshold chosen on dev, in 38 min on shared cores; baselines: always no
answer EM / F1 40.7, first sentence F1 3.6 (HasAns F1 6.0)
(`python -m research.metrics.squad DEV.json --baseline null`).
"""

from experiments import _squad_common as common


def get_config(arg=None):
  """SQuAD v2.0: the shared recipe, 2 epochs at lr 5e-5, batch 48."""
  return common.get_config(
      arg, "experiments/squad_v2.py", tfds_name="squad/v2.0",
      hf_name="rajpurkar/squad_v2", version_2=True, epochs=2,
      learning_rate=5e-5, batch_size=48)
