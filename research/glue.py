"""GLUE: task facts and published references.

- `TASKS`: each GLUE task's label names in GLUE's id order and the test files
  the GLUE server expects (research.predict writes them).
- `task_of(config)`: the GLUE task a run's config trains on, if any.
- `load_references()`: the published numbers kept in `references/*.csv`,
  each row with its source.

The results table of sweeps (`python -m research.results`) is in
`research/results.py`, beside the sweep.

Numbers in tables are x100 (percent, or correlation x100), as published.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

REFERENCES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "references")
PAPER_TEST_CSV = "bert_paper_glue_test.csv"
HF_DEV_CSV = "hf_bert_base_cased_glue_dev.csv"


@dataclasses.dataclass(frozen=True)
class TestFile:
  """One file of a GLUE server submission.

  Attributes:
    dataset: the GLUE config holding the split ("mnli"; "ax" for AX.tsv).
    split: the test split ("test", "test_matched").
    filename: the name the server expects ("MNLI-m.tsv").
  """
  dataset: str
  split: str
  filename: str


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """A GLUE task.

  Attributes:
    name: as TFDS (glue/<name>) and nyu-mll/glue (config <name>) call it.
    labels: the label names in GLUE's id order; () for regression (STS-B).
    test_files: what research.predict writes for a run of this task.
    label_strings: the server wants label names (the entailment tasks);
      otherwise ids (or, for STS-B, scores).
  """
  name: str
  labels: tuple
  test_files: tuple
  label_strings: bool


def _task(name, labels, filename, label_strings=False):
  return GlueTask(name, labels, (TestFile(name, "test", filename),),
                  label_strings)


# In the GLUE paper's order, which the results table follows.
TASKS = {
    "cola": _task("cola", ("unacceptable", "acceptable"), "CoLA.tsv"),
    "sst2": _task("sst2", ("negative", "positive"), "SST-2.tsv"),
    "mrpc": _task("mrpc", ("not_equivalent", "equivalent"), "MRPC.tsv"),
    "stsb": _task("stsb", (), "STS-B.tsv"),
    "qqp": _task("qqp", ("not_duplicate", "duplicate"), "QQP.tsv"),
    # The server also wants AX.tsv, the diagnostic set, predicted by the
    # MNLI model (same three labels).
    "mnli": GlueTask("mnli", ("entailment", "neutral", "contradiction"), (
        TestFile("mnli", "test_matched", "MNLI-m.tsv"),
        TestFile("mnli", "test_mismatched", "MNLI-mm.tsv"),
        TestFile("ax", "test", "AX.tsv")), label_strings=True),
    "qnli": _task("qnli", ("entailment", "not_entailment"), "QNLI.tsv", True),
    "rte": _task("rte", ("entailment", "not_entailment"), "RTE.tsv", True),
    # GLUE's WNLI files use 1 = entailment, and the server wants ids.
    "wnli": _task("wnli", ("not_entailment", "entailment"), "WNLI.tsv"),
}
HF_GLUE_NAMES = ("nyu-mll/glue", "glue")


def _get(config, dotted, default=None):
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError):
      return default
  return node


def task_of(config):
  """The GLUE task of a run config (ConfigDict or config.json dict), or None.

  TFDS `glue/<task>` and Hugging Face `nyu-mll/glue` with hf_config <task>
  are GLUE; local files are not (their task is unknown).
  """
  source, name = _get(config, "data.source"), _get(config, "data.name", "")
  if source == "tfds" and name.startswith("glue/"):
    task = name.split("/", 1)[1]
  elif source == "hf" and name in HF_GLUE_NAMES:
    task = _get(config, "data.hf_config", "")
  else:
    return None
  return task if task in TASKS else None


def submission_labels(task, label_names):
  """What the GLUE file says for each of a run's class ids.

  Args:
    task: a key of TASKS (a classification task).
    label_names: the run's labels.json names in id order; GLUE's names, or
      "0", "1", ... taken as GLUE's ids.

  Returns:
    A list: entry i is the text to write for predicted id i (a GLUE label
    name or id).

  Raises:
    ValueError: a name that is neither a GLUE label of `task` nor its id.
  """
  spec = TASKS[task]
  out = []
  for name in label_names:
    if name in spec.labels:
      glue_id = spec.labels.index(name)
    elif name.isdigit() and int(name) < len(spec.labels):
      glue_id = int(name)
    else:
      raise ValueError(f"label {name!r} of the run is not a GLUE {task} "
                       f"label; valid: {', '.join(spec.labels)} or their ids")
    out.append(spec.labels[glue_id] if spec.label_strings else str(glue_id))
  return out


def format_score(value):
  """An STS-B prediction as GLUE takes it: a float clipped to [0, 5]."""
  return f"{min(max(float(value), 0.0), 5.0):.4f}"


# --- Published references -----------------------------------------------------


def _read_csv(path):
  """Rows of a references CSV as dicts; lines starting with # are comments."""
  with open(path, encoding="utf-8") as f:
    lines = [l for l in f if l.strip() and not l.startswith("#")]
  return list(csv.DictReader(io.StringIO("".join(lines))))


def _number(text):
  return float(text) if text.strip() else None


def load_references(directory=REFERENCES_DIR):
  """The published numbers, keyed by (task, metric key as in our tables).

  Returns:
    {"paper_test": {(model, task, metric): value},
     "hf_dev": {(task, metric): {"flax_best", "flax_mean", "flax_stdev",
                                 "pytorch": value or None}}}.
    Values are x100, as published.
  """
  paper = {(r["model"], r["task"], r["metric"]): _number(r["value"])
           for r in _read_csv(os.path.join(directory, PAPER_TEST_CSV))}
  hf = {(r["task"], r["metric"]): {k: _number(r[k]) for k in (
      "flax_best", "flax_mean", "flax_stdev", "pytorch")}
        for r in _read_csv(os.path.join(directory, HF_DEV_CSV))}
  return {"paper_test": paper, "hf_dev": hf}
