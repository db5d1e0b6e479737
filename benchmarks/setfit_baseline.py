r"""The `setfit` package (PyTorch) on the few-shot protocol's own splits.

    pip install "setfit>=1.2,<1.3"     # or: pip install -e ".[setfit]"
    python benchmarks/setfit_baseline.py --splits /tmp/fs/cr/setfit --k 16 \
        --workdir /tmp/fs/cr/setfit_package

Reads the K-shot training files and the test file that
`python -m research.fewshot` wrote under `--splits` (its
`data/k<K>/seed<S>/train.jsonl` and `data/test-*.jsonl`), so both frameworks
see the same examples, and trains setfit's SetFitModel from the same
checkpoint (default: the packaged all-MiniLM-L6-v2, a sentence-transformers
directory) with the defaults experiments/fewshot_setfit.py copies:
oversampled contrastive pairs, CosineSimilarityLoss, 1 epoch, batch 16,
body learning rate 2e-5, a scikit-learn LogisticRegression head. A text pair
(RTE) is one text joined by " [SEP] " (the tokenizer reads it as the
separator). Writes `<workdir>/k<K>/seed<S>/result.json` and
`<workdir>/k<K>/summary.json` in the protocol's format, so
`python -m research.fewshot --table` puts it beside our rows. The wall time
of a split counts from loading the model to the test predictions;
`torch.set_num_threads(--threads)` (2: this machine's cores).
"""

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def read(path, text_fields, label_field):
  texts, labels = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      texts.append(" [SEP] ".join(row[k] for k in text_fields))
      labels.append(str(row[label_field]))
  return texts, labels


def run_split(model_dir, train_path, test_path, seed, args):
  """One split: setfit's train, then accuracy on the test file."""
  import datasets  # pylint: disable=import-outside-toplevel
  import setfit  # pylint: disable=import-outside-toplevel
  fields = tuple(args.text_fields.split(","))
  train_texts, train_labels = read(train_path, fields, args.label_field)
  test_texts, test_labels = read(test_path, fields, args.label_field)
  names = sorted(set(train_labels))
  to_id = {n: i for i, n in enumerate(names)}
  start, cpu = time.perf_counter(), time.process_time()
  model = setfit.SetFitModel.from_pretrained(model_dir)
  with tempfile.TemporaryDirectory() as out:
    training = setfit.TrainingArguments(
        output_dir=out, batch_size=args.batch, num_epochs=args.epochs,
        body_learning_rate=args.lr, sampling_strategy="oversampling",
        seed=seed, report_to="none", show_progress_bar=False,
        save_strategy="no", logging_strategy="no")
    trainer = setfit.Trainer(
        model=model, args=training, train_dataset=datasets.Dataset.from_dict(
            {"text": train_texts,
             "label": [to_id[l] for l in train_labels]}))
    trainer.train()
  trained = time.perf_counter()
  predictions = np.asarray(model.predict(test_texts, batch_size=64))
  done = time.perf_counter()
  gold = np.asarray([to_id.get(l, -1) for l in test_labels])
  return {"seed": seed, "train_file": train_path,
          "test": {"test/accuracy": float((predictions == gold).mean())},
          "train_s": trained - start, "test_s": done - trained,
          "wall_s": done - start, "cpu_s": time.process_time() - cpu,
          "date": time.strftime("%Y-%m-%d")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--splits", required=True, help="A research.fewshot "
                      "workdir whose data/ holds the splits.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--seeds", default="13,21,42,87,100")
  parser.add_argument("--model", default="all-minilm-l6-v2",
                      help="An alias of research.models.hf or a directory.")
  parser.add_argument("--text_fields", default="sentence")
  parser.add_argument("--label_field", default="label")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--lr", type=float, default=2e-5)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--label", default="setfit package (PyTorch)")
  parser.add_argument("--dataset", default="", help="The table's column "
                      "name (default: the --splits protocol's).")
  args = parser.parse_args()

  import torch  # pylint: disable=import-outside-toplevel
  from research.fewshot import sampling, table  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  model_dir = args.model
  if not os.path.isdir(model_dir):
    from research.models import hf  # pylint: disable=import-outside-toplevel
    model_dir = str(hf.resolve(args.model))
  tests = sorted(glob.glob(os.path.join(args.splits, "data", "test-*.jsonl")))
  if not tests:
    sys.exit(f"error: no data/test-*.jsonl under --splits={args.splits}; run "
             "python -m research.fewshot there first")
  results = []
  for seed in (int(s) for s in args.seeds.split(",")):
    out_dir = os.path.join(args.workdir, f"k{args.k}", f"seed{seed}")
    path = os.path.join(out_dir, table.RESULT)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        results.append(json.load(f))
      continue
    train_path = os.path.join(args.splits, "data", f"k{args.k}",
                              f"seed{seed}", "train.jsonl")
    if not os.path.exists(train_path):
      sys.exit(f"error: {train_path} not found (--k, --seeds, --splits)")
    result = run_split(model_dir, train_path, tests[0], seed, args)
    print(f"seed {seed}: {result['test']} in {result['wall_s']:.0f} s",
          flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
    results.append(result)
  info = {"dataset": args.dataset} if args.dataset else {}
  spec = os.path.join(args.splits, f"k{args.k}", table.SUMMARY)
  if not info and os.path.exists(spec):  # the protocol's name of the data
    with open(spec, encoding="utf-8") as f:
      info["dataset"] = json.load(f).get("dataset")
  _, test_labels = read(tests[0], args.text_fields.split(","),
                        args.label_field)
  summary = table.summarize(
      results, sampling.majority(test_labels), k=args.k, label=args.label,
      model=args.model, framework="setfit " + __import__("setfit").__version__,
      **info)
  with open(os.path.join(args.workdir, f"k{args.k}", table.SUMMARY), "w",
            encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  acc = summary["test/accuracy"]
  print(f"test/accuracy: {100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}; "
        f"wall time per split {summary['wall_s']:.0f} s")


if __name__ == "__main__":
  main()
