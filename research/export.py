"""Exports a run's checkpoint as a Hugging Face model directory.

    python -m research.export --workdir /tmp/quickstart --out /tmp/quickstart_hf
    python -m research.export --workdir /tmp/quickstart --out DIR --which=latest
    python -m research.export --workdir /tmp/lora_run --out DIR --peft

A LoRA or AdaLoRA run exports its updates merged into the weights, or with
`--peft` as a Hugging Face PEFT adapter directory (adapter_config.json,
adapter_model.safetensors) for `peft.PeftModel.from_pretrained` on the base
model. Adapter and prefix-tuning runs change the network's structure, which
a `transformers` BERT cannot hold: their export is refused.

The directory (config.json, model.safetensors, tokenizer files, id2label)
loads in `transformers`, e.g. `BertForSequenceClassification.from_pretrained`.
A masked-LM run (DAPT / TAPT) keeps its base checkpoint's pooler in the
export (`keep_base_pooler`), for the fine-tuning that follows.
"""

from __future__ import annotations

import os
import sys

from research import data, train
from research.models import hf


def export_run(workdir: str, out_dir: str, which: str = "best",
               peft_dir: bool = False) -> str:
  """Restores the run's best (or latest) model and writes it out.

  The model is the run's trained parameters merged with its frozen ones
  (`train.restore`: a BitFit or LoRA run exports the whole model).

  Args:
    workdir: a finished or running `research.train` workdir.
    out_dir: the Hugging Face directory to write.
    which: "best" (by config.eval_metric) or "latest".
    peft_dir: write the LoRA/AdaLoRA adapters as a PEFT directory instead.

  Returns:
    The output directory.
  """
  from research.peft import hf_peft  # pylint: disable=import-outside-toplevel
  restored = train.restore(workdir, which)
  model = restored.model
  structural = {n for n in ("adapters", "prefix_tuning")
                if n in tuple(restored.config.get("methods", ()))}
  if structural:
    raise ValueError(f"{workdir}: methods {sorted(structural)} add layers a "
                     "transformers BERT does not have; use the run's "
                     "checkpoints (research.train.restore)")
  if peft_dir:
    name = next((n for n in ("lora", "adalora")
                 if n in tuple(restored.config.methods)), None)
    if name is None:
      raise ValueError(f"{workdir}: --peft needs a lora or adalora run; "
                       f"config.methods={tuple(restored.config.methods)}")
    options = dict(restored.config.method_options.get(name, {}) or {})
    options.setdefault("total_step", restored.config.get("total_steps", 0)
                       or restored.step)
    hf_peft.export(model, out_dir, task=restored.task.HEAD, options=options,
                   base_model_name_or_path=restored.config.model.name)
    print(f"exported the {name} adapters of step {restored.step} "
          f"({restored.which}) to {out_dir}")
    return out_dir
  merge_layers(model)
  label_names = data.load_label_names(os.path.join(workdir, "labels.json"))
  base = hf.resolve(restored.config.model.name)
  hf.export(model, out_dir, restored.task.HEAD, tokenizer_dir=base,
            label_names=label_names or None)
  from_scratch = (restored.config.get("task_options") or {}).get("architecture")
  if getattr(getattr(model, "bert", None), "pooler", 0) is None and not from_scratch:
    copied = keep_base_pooler(out_dir, base)
    if copied:
      print(f"kept the base checkpoint's pooler ({', '.join(copied)})")
  print(f"exported step {restored.step} ({restored.which}) to {out_dir}")
  return out_dir


def merge_layers(model):
  """Folds into its kernel what a layer computes with besides it, in place.

  Every layer with a `merge()` method: LoRA / AdaLoRA (B A added to the
  kernel), a pruning mask (`research.methods.pruning.layers.PrunedDense`:
  the kernel masked).
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  for _, module in nnx.iter_modules(model):
    if callable(getattr(module, "merge", None)):
      module.merge()
  return model


def keep_base_pooler(out_dir, base_dir) -> list[str]:
  """Copies the base checkpoint's pooler into an exported poolerless model.

  A masked-LM model has no pooler (nor has HF's BertForMaskedLM, which
  ignores one on load). Without this, a classifier fine-tuned from a DAPT /
  TAPT export would start from a fresh pooler where one fine-tuned from the
  base starts from the base's: the comparison would measure the pooler.

  Returns:
    The names written ([] when the base has no pooler of the same shape).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  source = os.path.join(str(base_dir), "model.safetensors")
  target = os.path.join(str(out_dir), "model.safetensors")
  if not os.path.exists(source):
    return []
  base, weights = load_file(source), load_file(target)
  copied = []
  for name in ("pooler.dense.weight", "pooler.dense.bias"):
    # A BertModel's names have no "bert." prefix; a BertFor*'s have it.
    found = next((k for k in (name, "bert." + name) if k in base), None)
    embed = weights.get("bert.embeddings.word_embeddings.weight")
    if found is None or embed is None or base[found].shape[-1] != embed.shape[-1]:
      return []
    weights["bert." + name] = np.ascontiguousarray(base[found])
    copied.append("bert." + name)
  save_file(weights, target, metadata={"format": "pt"})
  return copied


def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "The run's workdir.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint.")
  flags.DEFINE_boolean("peft", False, "Write a LoRA/AdaLoRA run's adapters "
                       "as a Hugging Face PEFT directory.")
  flags.mark_flags_as_required(["workdir", "out"])

  def run(argv):
    del argv
    try:
      export_run(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.which,
                 flags.FLAGS.peft)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(run)


if __name__ == "__main__":
  main()
