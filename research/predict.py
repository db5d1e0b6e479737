"""Writes a run's predictions: GLUE test files, SQuAD and CoNLL outputs.

    python -m research.predict --workdir /tmp/glue/rte/lr=3e-05,seed=2 \
        --out /tmp/glue_test
    python -m research.predict --workdir RUN --out DIR --which=latest

Restores the run's best checkpoint (by its eval_metric; `--which=latest`: the
last one), predicts its task's test split(s) from the source it trained on
(TFDS glue/<task> or Hugging Face nyu-mll/glue) and writes, under --out, the
task's files among CoLA.tsv, SST-2.tsv, MRPC.tsv, STS-B.tsv, QQP.tsv,
MNLI-m.tsv, MNLI-mm.tsv, QNLI.tsv, RTE.tsv, WNLI.tsv, plus AX.tsv (the
diagnostic set) from an MNLI run. Run it once per task into one directory and
zip that directory to submit.

Each file is `index<TAB>prediction`: label names for MNLI, AX, QNLI and RTE;
ids for CoLA, SST-2, MRPC, QQP and WNLI; scores clipped to [0, 5] for STS-B;
rows sorted by index. The index is GLUE's, the `idx` feature of both
sources, read beside the texts: TFDS stores GLUE shuffled by example key, so
the read order is not the index order.

Any other run (SQuAD, NER, ...) has its evaluators write their predictions,
one directory per evaluator under --out, for the run's evaluation splits or
for `--eval_file` (a local file in the run's format):

    python -m research.predict --workdir /tmp/squad_v2 --out DIR \
        [--eval_file dev-v2.0.json] [--null_threshold -1.5]

The `span` evaluator (question answering) writes predictions.json and, for
SQuAD v2.0, null_odds.json: the official evaluation scripts' inputs; the
v2.0 null threshold is the best on the split when it is labeled (chosen on
dev), else `--null_threshold`, else the run's last `best_null_threshold`.
The `tagging` evaluator (NER) writes predictions.conll, `token gold
predicted` per word (words, not sub-tokens).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys

import ml_collections
import numpy as np

from research import data, glue, restore
from research.models import hf

log = logging.getLogger("research.predict")


def make_predictor(restored):
  """`(split, batch_size, buckets) -> predictions` of a restored run, by a
  `sequence` evaluator over the run's own evaluation step."""

  def predict(split, batch_size, buckets=()):
    return restored.make_evaluator(split, batch_size, buckets).predict(
        restored.params, restored.frozen)["predictions"]

  return predict


def predict_split(predictor, split, batch_size, buckets=()):
  """Predictions for every example of `split`, in its order (`split.rows`)."""
  return predictor(split, batch_size, buckets)


def example_ids(config, dataset, split):
  """GLUE's index of each example, in the order the data pipeline reads them.

  Args:
    config: the test-split config (data.source, data.name, data.data_dir).
    dataset: the GLUE config ("mnli", "ax").
    split: the split name.

  Returns:
    int64 [rows in the source]: entry r - 1 is the index of row r.
  """
  if config.data.source == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    # tfds.load reads files in order (shuffle_files=False), as
    # research.data.sources.TfdsSplit does.
    ds = tfds.load(f"glue/{dataset}", split=split,
                   data_dir=config.data.data_dir or None)
    return np.concatenate([b for b in tfds.as_numpy(
        ds.map(lambda ex: ex["idx"]).batch(4096))] or [np.zeros(0, np.int64)]
                          ).astype(np.int64)
  import datasets  # pylint: disable=import-outside-toplevel
  ds = datasets.load_dataset(config.data.name, dataset, split=split,
                             cache_dir=config.data.data_dir or None)
  return np.asarray(ds["idx"], np.int64)


def test_config(config, test_file):
  """The run's data config pointed at one test split, no training split."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.data.train_split = ""
  cfg.data.eval_splits = (test_file.split,)
  if cfg.data.source == "tfds":
    cfg.data.name = f"glue/{test_file.dataset}"
  else:
    cfg.data.hf_config = test_file.dataset
  # Every index needs a prediction: unreadable rows (e.g. an empty text) are
  # dropped here and filled in `write_predictions`, with a warning.
  cfg.data.bad_rows = "skip"
  return cfg


def write_predictions(path, ids, rows, predictions, formatter):
  """Writes `index<TAB>prediction`, one line per index, sorted by index.

  Args:
    path: the .tsv file.
    ids: GLUE index of every source row (see `example_ids`).
    rows: 1-based source row of each prediction (`split.rows`).
    predictions: ids or scores, aligned with `rows`.
    formatter: prediction -> cell text.

  Returns:
    The number of rows filled in because the pipeline skipped them.
  """
  value = {int(ids[r - 1]): p for r, p in zip(rows, predictions)}
  missing = [int(i) for i in ids if int(i) not in value]
  if missing:
    # The most frequent prediction (mean score for STS-B) stands in.
    fill = (float(np.mean(predictions)) if predictions.dtype.kind == "f" else
            collections.Counter(predictions.tolist()).most_common(1)[0][0])
    log.warning("%s: %d rows could not be read (indices %s%s); wrote %r for "
                "them", path, len(missing), missing[:10],
                " ..." if len(missing) > 10 else "", formatter(fill))
    value.update({i: fill for i in missing})
  with open(path, "w", encoding="utf-8") as f:
    f.write("index\tprediction\n")
    for index in sorted(value):
      f.write(f"{index}\t{formatter(value[index])}\n")
  return len(missing)


def write_run(workdir, out_dir, which="best", batch_size=0, eval_file="",
              **write_options):
  """Writes each evaluator's predictions of a (non-GLUE) run.

  Args:
    workdir: a research.train workdir.
    out_dir: predictions go to <out_dir>/<evaluator name>/.
    which: "best" or "latest" checkpoint.
    batch_size: examples per forward pass; 0: the run's eval_batch_size.
    eval_file: predict this local file (the run's format) instead of the
      run's evaluation splits; it is the split "validation".
    **write_options: options of the evaluators' `write` (those each type
      declares in `WRITE_OPTIONS`, e.g. the span evaluator's
      `null_threshold`); None values are left out.

  Returns:
    {evaluator name: what its `write` returned (paths, scores)}.

  Raises:
    ValueError: an evaluator type that cannot write predictions, or an
      option none of the run's evaluators takes.
  """
  from research import evaluators  # pylint: disable=import-outside-toplevel
  restored = restore.restore_run(workdir, which)
  config = restored.config
  log.info("%s: %s checkpoint, step %d", workdir, restored.which,
           restored.step)
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.data.train_split, cfg.data.train_file = "", ""
  if eval_file:
    cfg.data.source, cfg.data.eval_file = "local", eval_file
    cfg.data.format = "auto"  # by the file: its extension (and layout)
  _, splits, _, _ = data.load_splits(
      cfg, restored.tokenizer, cache_dir=os.path.join(workdir, "cache"),
      label_names=list(restored.label_names) or None, task=restored.task)
  # The run's summary: what it chose on its dev split (e.g. a threshold).
  summary = restore.read_summary(workdir)
  given = {k: v for k, v in write_options.items() if v is not None}
  written, takers = {}, set()
  for name, ecfg in evaluators.configs(cfg, restored.task).items():
    options = evaluators.options(name, ecfg)
    split = splits[options.pop("split")]
    cls = evaluators.module(ecfg["type"], name).Evaluator
    if not hasattr(cls, "write"):
      raise ValueError(f"evaluator {name!r} (type {ecfg['type']!r}) cannot "
                       "write predictions; types that can: span, tagging")
    evaluator = restored.make_evaluator(
        split, batch_size or config.eval_batch_size,
        tuple(config.data.buckets), name=name, cls=cls, **options)
    mine = {k: v for k, v in given.items() if k in cls.WRITE_OPTIONS}
    takers.update(mine)
    written[name] = evaluator.write(restored.params, restored.frozen,
                                    os.path.join(out_dir, name),
                                    summary=summary, **mine)
    print(f"{name}: {json.dumps(written[name])}")
  unused = sorted(set(given) - takers)
  if unused:
    raise ValueError(f"--{unused[0]} is not an option of this run's "
                     "evaluators")
  return written


def predict_run(workdir, out_dir, which="best", batch_size=0):
  """Writes the GLUE test files of one run.

  Args:
    workdir: a research.train workdir of a GLUE task (TFDS or HF source).
    out_dir: where the .tsv files go (created).
    which: "best" or "latest" checkpoint.
    batch_size: examples per forward pass; 0: the run's eval_batch_size.

  Returns:
    {file name: number of rows written}.

  Raises:
    ValueError: the run is not a GLUE run (local data has no test split
      here), or its labels are not GLUE's.
    FileNotFoundError: no config or checkpoint in `workdir`.
  """
  config = restore.read_config(workdir)
  task = glue.task_of(config)
  if task is None:
    raise ValueError(
        f"{workdir}: not a GLUE run (data.source={config.data.source!r}, "
        f"data.name={config.data.name!r}); research.predict needs TFDS "
        "glue/<task> or Hugging Face nyu-mll/glue data, whose test splits "
        f"it predicts; GLUE tasks: {', '.join(glue.TASKS)}")
  spec = glue.TASKS[task]
  regression = config.num_labels == 1
  label_names = data.load_label_names(os.path.join(workdir, "labels.json"))
  if regression:
    formatter = glue.format_score
  else:
    cells = glue.submission_labels(task, label_names)
    formatter = lambda i: cells[int(i)]  # pylint: disable=unnecessary-lambda-assignment
  restored = restore.restore_run(workdir, which)
  tokenizer = restored.tokenizer
  log.info("%s: %s checkpoint, step %d", workdir, restored.which,
           restored.step)
  predictor = make_predictor(restored)
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for test_file in spec.test_files:
    cfg = test_config(config, test_file)
    _, splits, _, _ = data.load_splits(
        cfg, tokenizer, cache_dir=os.path.join(workdir, "cache"),
        label_names=label_names, task=restored.task)
    split = splits[test_file.split]
    # A packed run's buckets are row lengths: let prediction choose its own.
    buckets = (tuple(config.data.buckets)
               if config.data.examples_per_row == 1 else ())
    predictions = predict_split(predictor, split,
                                batch_size or config.eval_batch_size, buckets)
    ids = example_ids(cfg, test_file.dataset, test_file.split)
    path = os.path.join(out_dir, test_file.filename)
    write_predictions(path, ids, split.rows, predictions, formatter)
    written[test_file.filename] = len(ids)
    print(f"{path}: {len(ids)} predictions ({task}, {restored.which} "
          f"checkpoint, step {restored.step})")
  return written


def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from research.training.checkpointing import CheckpointError  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "The run's workdir.")
  flags.DEFINE_string("out", None, "Directory for the GLUE .tsv files.")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint.")
  flags.DEFINE_integer("batch_size", 0, "Examples per forward pass (0: the "
                       "run's eval_batch_size).")
  flags.DEFINE_string("eval_file", "", "Non-GLUE runs: predict this local "
                      "file instead of the run's evaluation splits.")
  flags.DEFINE_float("null_threshold", None, "SQuAD v2.0: predict no answer "
                     "above these null odds (default: the best on a labeled "
                     "split, else the run's last best_null_threshold).")
  flags.mark_flags_as_required(["workdir", "out"])

  def run(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    f = flags.FLAGS
    try:
      if glue.task_of(restore.read_config(f.workdir)) is None:
        write_run(f.workdir, f.out, f.which, f.batch_size, f.eval_file,
                  null_threshold=f.null_threshold)
      else:
        predict_run(f.workdir, f.out, f.which, f.batch_size)
    except (FileNotFoundError, ValueError, hf.CheckpointError,
            CheckpointError, data.DataError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(run)


if __name__ == "__main__":
  main()
