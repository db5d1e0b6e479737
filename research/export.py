"""Exports a run's checkpoint as a Hugging Face model directory.

    python -m research.export --workdir /tmp/quickstart --out /tmp/quickstart_hf
    python -m research.export --workdir /tmp/quickstart --out DIR --which=latest

The directory (config.json, model.safetensors, tokenizer files, id2label)
loads in `transformers`, e.g. `BertForSequenceClassification.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
from flax import nnx

from research import data
from research.models import hf
from research.predict import best_metric_key
from research.training.checkpointing import Checkpointer, abstract_like


def export_run(workdir: str, out_dir: str, which: str = "best") -> str:
  """Restores the run's best (or latest) parameters and writes them out.

  Args:
    workdir: a finished or running `research.train` workdir.
    out_dir: the Hugging Face directory to write.
    which: "best" (by config.eval_metric) or "latest".

  Returns:
    The output directory.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"--which={which!r}; valid: best, latest")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: not found; is {workdir} a "
                            "research.train workdir?")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model_dir = hf.resolve(config.model.name)
  model, _ = hf.load_pretrained(str(model_dir), config.task, config.num_labels)
  graphdef, params = nnx.split(model, nnx.Param)
  with Checkpointer(workdir, best_metric=best_metric_key(config),
                    best_mode=config.eval_metric_mode) as checkpointer:
    best = which == "best" and checkpointer.best_step() is not None
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint to export")
    # Restore only the parameters: the optimiser state is not exported.
    step, state, _ = checkpointer.restore(
        {"params": abstract_like(params)}, best=best, partial=True)
  model = nnx.merge(graphdef, state["params"])
  label_names = data.load_label_names(os.path.join(workdir, "labels.json"))
  hf.export(model, out_dir, config.task, tokenizer_dir=model_dir,
            label_names=label_names or None)
  print(f"exported step {step} ({'best' if best else 'latest'}) to {out_dir}")
  return out_dir


def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "The run's workdir.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint.")
  flags.mark_flags_as_required(["workdir", "out"])

  def run(argv):
    del argv
    try:
      export_run(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.which)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(run)


if __name__ == "__main__":
  main()
