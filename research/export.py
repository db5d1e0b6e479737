"""Exports a run's checkpoint: Hugging Face, ONNX or StableHLO.

    python -m research.export --workdir /tmp/quickstart --out /tmp/quickstart_hf
    python -m research.export --workdir /tmp/quickstart --out DIR --which=latest
    python -m research.export --workdir /tmp/lora_run --out DIR --peft
    python -m research.export --workdir /tmp/quickstart --out DIR --format onnx
    python -m research.export --workdir /tmp/quickstart --out DIR --format stablehlo

`--format onnx` (jax2onnx) and `--format stablehlo` (jax.export) write the
model's forward with a dynamic batch and length, plus what
`python -m research.serve --model_dir DIR` needs (research/export_formats.py).

A LoRA or AdaLoRA run exports its updates merged into the weights, or with
`--peft` as a Hugging Face PEFT adapter directory (adapter_config.json,
adapter_model.safetensors) for `peft.PeftModel.from_pretrained` on the base
model. Adapter and prefix-tuning runs change the network's structure, which
a `transformers` BERT cannot hold: their export is refused.

The directory (config.json, model.safetensors, tokenizer files, id2label)
loads in `transformers`, e.g. `BertForSequenceClassification.from_pretrained`.
A masked-LM run (DAPT / TAPT) keeps its base checkpoint's pooler in the
export (`keep_base_pooler`) and, from a sentence-transformers base, its
declared pooling (`keep_base_pooling`: `1_Pooling/config.json`), so that
the fine-tuning that follows reads the encoder as one from the base would.

A sequence classifier that pools otherwise than with BERT's pooler
(`config.model.pooling` cls, mean or max; `auto` on a sentence-transformers
base) has no `transformers` class (`BertForSequenceClassification` reads the
pooler): it is written as a sentence-transformers directory
(`hf.export_sentence_transformers`: encoder, Pooling, the classifier as a
Dense module writing `logits`), which `SentenceTransformer(out)` loads with
the same embeddings. Other sentence-level heads (pre-training's NSP) with
such a pooling are refused, naming the option.
"""

from __future__ import annotations

import os
import sys

from research import methods as methods_lib
from research import restore
from research.models import heads, hf
from research.models import pooling as pooling_lib


def export_run(workdir: str, out_dir: str, which: str = "best",
               peft_dir: bool = False) -> str:
  """Restores the run's best (or latest) model and writes it out.

  The model is the run's trained parameters merged with its frozen ones
  (`restore.restore_run`: a BitFit or LoRA run exports the whole model),
  then made ready by each method (`Method.export_model`: LoRA folds its
  updates in; a method whose layers the format cannot hold refuses).

  Args:
    workdir: a finished or running `research.train` workdir.
    out_dir: the Hugging Face directory to write.
    which: "best" (by config.eval_metric) or "latest".
    peft_dir: write the trained adapters alone, through the method that can
      (`Method.export_adapters`: LoRA/AdaLoRA as a PEFT directory).

  Returns:
    The output directory.
  """
  return export_restored(restore.restore_run(workdir, which), out_dir,
                         peft_dir)


def export_restored(restored: restore.Restored, out_dir: str,
                    peft_dir: bool = False) -> str:
  """`export_run` of a restored run, or of one whose model was replaced
  (`Restored.with_model`: a model soup)."""
  workdir = restored.workdir
  model = restored.model
  if peft_dir:
    able = [m for m in restored.methods if m.export_adapters is not None]
    if not able:
      raise ValueError(
          f"{workdir}: --peft needs a method that exports its adapters alone "
          f"(lora, adalora); config.methods="
          f"{tuple(restored.config.get('methods', ()))}")
    what = able[0].export_adapters(model, out_dir, restored.context,
                                   restored.step)
    print(f"exported {what} of step {restored.step} ({restored.which}) to "
          f"{out_dir}")
    return out_dir
  model = methods_lib.export_model(restored.methods, model)
  base = restored.context.model_dir
  labels = list(restored.label_names) or None
  from_scratch = (restored.config.get("task_options") or {}).get("architecture")
  pooling = getattr(getattr(model, "bert", None), "pooling", None)
  if write_model(model, out_dir, restored.task.HEAD, tokenizer_dir=base,
                 label_names=labels,
                 max_length=restored.config.data.max_length, where=workdir):
    keep_base_pooler(out_dir, base, prefix="")  # unused; loads without noise
    print(f"exported step {restored.step} ({restored.which}) to {out_dir} as "
          f"a sentence-transformers directory ({pooling} pooling; "
          "config.model.pooling)")
    return out_dir
  if pooling is None and not from_scratch:
    copied = keep_base_pooler(out_dir, base)
    if copied:
      print(f"kept the base checkpoint's pooler ({', '.join(copied)})")
    if keep_base_pooling(out_dir, base):
      print("kept the base checkpoint's declared pooling (1_Pooling/)")
  print(f"exported step {restored.step} ({restored.which}) to {out_dir}")
  return out_dir


def write_model(model, out_dir, head, *, tokenizer_dir, label_names,
                max_length: int, where: str) -> bool:
  """Writes `model` in the format its pooling allows; True where that is a
  sentence-transformers directory (the module docstring), False for a
  Hugging Face directory. `where` names the run in messages."""
  pooling = getattr(getattr(model, "bert", None), "pooling", None)
  if pooling in (None, "pooler"):
    hf.export(model, out_dir, head, tokenizer_dir=tokenizer_dir,
              label_names=label_names)
    return False
  if head is not heads.SequenceClassification:
    raise ValueError(
        f"{where}: config.model.pooling resolved to {pooling!r}, but "
        f"transformers' {head.hf_architecture} pools with BERT's pooler "
        f"and a sentence-transformers directory holds a classifier only: "
        f"this {head.__name__} run cannot be exported (train with "
        "--config.model.pooling=pooler, or use its checkpoint through "
        "research.restore)")
  if model.bert.pruned_heads:  # (research.compress --prune_heads)
    raise ValueError(
        f"{where}: a {pooling}-pooled model with heads removed has no export "
        "format here (a sentence-transformers directory holds whole layers); "
        "compress without --out, or train with --config.model.pooling=pooler")
  hf.export_sentence_transformers(model, out_dir, tokenizer_dir=tokenizer_dir,
                                  label_names=label_names,
                                  max_seq_length=max_length)
  return True


def keep_base_pooling(out_dir, base_dir) -> bool:
  """Copies a sentence-transformers base's `1_Pooling/config.json`.

  A masked-LM export of such a base (TAPT of all-MiniLM-L6-v2) would
  otherwise fine-tune with `config.model.pooling=auto` through the pooler,
  where the base fine-tunes through its declared mean pooling.

  Returns:
    Whether it was copied.
  """
  import shutil  # pylint: disable=import-outside-toplevel
  if pooling_lib.checkpoint_pooling(base_dir) is None:
    return False
  import json  # pylint: disable=import-outside-toplevel
  modules = os.path.join(str(base_dir), "modules.json")
  folder = "1_Pooling"
  if os.path.exists(modules):
    with open(modules, encoding="utf-8") as f:
      folder = next(m.get("path", folder) for m in json.load(f)
                    if str(m.get("type", "")).endswith(".Pooling"))
  os.makedirs(os.path.join(str(out_dir), "1_Pooling"), exist_ok=True)
  shutil.copy(os.path.join(str(base_dir), folder, "config.json"),
              os.path.join(str(out_dir), "1_Pooling", "config.json"))
  return True


def keep_base_pooler(out_dir, base_dir, prefix="bert.") -> list[str]:
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
    # A BertModel's names have no "bert." prefix; a BertFor*'s have it;
    # `prefix` is the export's.
    found = next((k for k in (name, "bert." + name) if k in base), None)
    embed = weights.get(prefix + "embeddings.word_embeddings.weight")
    if found is None or embed is None or base[found].shape[-1] != embed.shape[-1]:
      return []
    weights[prefix + name] = np.ascontiguousarray(base[found])
    copied.append(prefix + name)
  save_file(weights, target, metadata={"format": "pt"})
  return copied


def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "The run's workdir.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint.")
  flags.DEFINE_boolean("peft", False, "Write a LoRA/AdaLoRA run's adapters "
                       "as a Hugging Face PEFT directory.")
  flags.DEFINE_enum("format", "hf", ["hf", "onnx", "stablehlo"],
                    "hf: a transformers directory; onnx: jax2onnx, checked "
                    "against JAX with onnxruntime; stablehlo: jax.export.")
  flags.mark_flags_as_required(["workdir", "out"])

  def run(argv):
    del argv
    f = flags.FLAGS
    try:
      if f.format != "hf":
        if f.peft:
          raise ValueError("--peft writes a Hugging Face PEFT directory; "
                           "drop it with --format onnx|stablehlo")
        from research import export_formats  # pylint: disable=import-outside-toplevel
        export_formats.export_run(f.workdir, f.out, f.format, f.which)
        return
      export_run(f.workdir, f.out, f.which, f.peft)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(run)


if __name__ == "__main__":
  main()
