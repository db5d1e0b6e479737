"""Exports a run's checkpoint as a Hugging Face model directory.

    python -m research.export --workdir /tmp/quickstart --out /tmp/quickstart_hf
    python -m research.export --workdir /tmp/quickstart --out DIR --which=latest

The directory (config.json, model.safetensors, tokenizer files, id2label)
loads in `transformers`, e.g. `BertForSequenceClassification.from_pretrained`.
"""

from __future__ import annotations

import os
import sys

from research import data, train
from research.models import hf


def export_run(workdir: str, out_dir: str, which: str = "best") -> str:
  """Restores the run's best (or latest) model and writes it out.

  The model is the run's trained parameters merged with its frozen ones
  (`train.restore`: a BitFit or LoRA run exports the whole model).

  Args:
    workdir: a finished or running `research.train` workdir.
    out_dir: the Hugging Face directory to write.
    which: "best" (by config.eval_metric) or "latest".

  Returns:
    The output directory.
  """
  restored = train.restore(workdir, which)
  label_names = data.load_label_names(os.path.join(workdir, "labels.json"))
  hf.export(restored.model, out_dir, restored.task.HEAD,
            tokenizer_dir=hf.resolve(restored.config.model.name),
            label_names=label_names or None)
  print(f"exported step {restored.step} ({restored.which}) to {out_dir}")
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
