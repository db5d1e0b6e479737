r"""How much of a task does a frozen checkpoint's pooler carry? A linear probe.

    python benchmarks/pooler_probe.py --task cola          # ~1 min on 2 cores

Logistic regression (scikit-learn) on three frozen features of the packaged
all-MiniLM-L6-v2 (or `--model`): BERT's pooler output (dense + tanh on
[CLS], what the classifier of a PEFT method with a frozen pooler reads), the
[CLS] hidden state, and the mean of the last hidden states (what
sentence-transformers trained). Dev Matthews correlation (CoLA) or accuracy
(RTE) per feature and regularisation strength C, and the features' scale.
Why it exists: BENCHMARKS.md, "Parameter-efficient fine-tuning on CoLA and
RTE" (AdaLoRA, prefix tuning and BitFit stayed at the majority class on
CoLA with the pooler frozen).
"""

import argparse
import csv
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
FIELDS = {"cola": ("sentence",), "rte": ("sentence1", "sentence2")}


def read(path, fields, limit):
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  rows = rows[:limit] if limit else rows
  texts = [tuple(r[k] for k in fields) for r in rows]
  return texts, np.array([int(r["label"]) for r in rows])


def features(model, tokenizer, texts, batch=128):
  import torch  # pylint: disable=import-outside-toplevel
  out = {"pooler": [], "cls": [], "mean": []}
  with torch.no_grad():
    for i in range(0, len(texts), batch):
      chunk = list(zip(*texts[i:i + batch]))
      enc = tokenizer(*chunk, padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
      o = model(**enc)
      h, m = o.last_hidden_state, enc["attention_mask"].unsqueeze(-1)
      out["pooler"].append(o.pooler_output.numpy())
      out["cls"].append(h[:, 0].numpy())
      out["mean"].append(((h * m).sum(1) / m.sum(1)).numpy())
  return {k: np.concatenate(v) for k, v in out.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", default="cola", choices=sorted(FIELDS))
  parser.add_argument("--model", default="all-minilm-l6-v2")
  parser.add_argument("--train_rows", type=int, default=3000)
  parser.add_argument("--data_dir", default=SHARED,
                      help="Holds glue_<task>/train.tsv and dev.tsv "
                      "(default: %(default)s; a fresh clone lacks it).")
  args = parser.parse_args()
  folder = os.path.join(args.data_dir, f"glue_{args.task}")
  missing = [os.path.join(folder, f) for f in ("train.tsv", "dev.tsv")
             if not os.path.exists(os.path.join(folder, f))]
  if missing:
    parser.error(f"--data_dir {args.data_dir}: missing {', '.join(missing)}")
  import transformers  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.metrics import accuracy_score, matthews_corrcoef  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  path = str(hf.resolve(args.model))
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.BertModel.from_pretrained(path).eval()
  train, y_train = read(os.path.join(folder, "train.tsv"), FIELDS[args.task],
                        args.train_rows)
  dev, y_dev = read(os.path.join(folder, "dev.tsv"), FIELDS[args.task], 0)
  f_train, f_dev = features(model, tokenizer, train), features(model, tokenizer, dev)
  score, name = ((matthews_corrcoef, "MCC") if args.task == "cola"
                 else (accuracy_score, "accuracy"))
  print(f"| feature | mean abs value | std across examples | dev {name} C=0.1 | C=1 | C=10 |")
  print("|---|---|---|---|---|---|")
  for key in ("pooler", "cls", "mean"):
    x = f_dev[key]
    cells = []
    for c in (0.1, 1.0, 10.0):
      probe = LogisticRegression(C=c, max_iter=2000).fit(f_train[key], y_train)
      cells.append(f"{score(y_dev, probe.predict(x)):.3f}")
    print(f"| {key} | {np.abs(x).mean():.3f} | {x.std(0).mean():.3f} | "
          + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
