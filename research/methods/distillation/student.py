r"""The student's initial checkpoint, written as a Hugging Face directory.

    python -m research.methods.distillation.student \
        --teacher all-minilm-l6-v2 --out /tmp/student_l3            # layers 2, 4, 6
    python -m research.methods.distillation.student \
        --teacher /tmp/distill/mr/teacher --layers 1,6 --out /tmp/student_l2
    python -m research.methods.distillation.student --teacher all-minilm-l6-v2 \
        --shape hidden_size=192,num_hidden_layers=4,num_attention_heads=4,intermediate_size=768 \
        --out /tmp/student_fresh

Two ways to make a student (the run then loads the directory as
`config.model.name`):

  layers  DistilBERT (Sanh et al. 2019): the teacher's embeddings, the
          chosen layers (1-based, in order; default every other one, ending
          with the top: 2, 4, 6 of 6) renumbered 1..k, and whatever else the
          teacher holds (pooler, a fine-tuned head) as it is. Exact: each
          student layer computes what its teacher layer computed on the
          same input (tests/test_distill.py).
  shape   a fresh encoder: the teacher's config with the given fields
          changed (any `BertConfig` field: hidden_size, num_hidden_layers,
          num_attention_heads, intermediate_size, ...), randomly
          initialised with `--seed`, encoder and pooler only.

The teacher is a Hugging Face directory or alias, or a `research.train`
workdir (its best checkpoint, or `--which latest`, exported first as
`research.export` does). Tokenizer files are copied, so the student reads
the teacher's token ids.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys
import tempfile

from research.models import create_model, heads, hf

_LAYER = re.compile(r"(^|\.)encoder\.layer\.(\d+)\.")


def every_other(num_layers: int) -> tuple:
  """One layer in two, ending with the top one: 2, 4, 6 of 6; 1, 3, 5 of 5."""
  return tuple(range(num_layers, 0, -2))[::-1]


def _teacher_dir(teacher: str, which: str, tmp: str) -> pathlib.Path:
  """A Hugging Face directory of the teacher (a workdir is exported)."""
  from research.methods.distillation import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
  if teacher_lib.is_run(teacher):
    from research import export  # pylint: disable=import-outside-toplevel
    return pathlib.Path(export.export_run(teacher, tmp, which))
  return hf.resolve(teacher)


def _write(out, tensors, raw_config, source):
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(out / "model.safetensors"),
                              metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
  for name in hf.TOKENIZER_FILES:
    if (source / name).is_file():
      shutil.copy(source / name, out / name)
  return out


def from_layers(teacher: str, out_dir, layers=None, which: str = "best"):
  """Writes a student made of the teacher's `layers` (1-based, in order).

  Args:
    teacher: a Hugging Face directory or alias, or a `research.train`
      workdir.
    out_dir: the directory to write.
    layers: the teacher layers kept, increasing; None: `every_other`.
    which: a workdir teacher's "best" or "latest" checkpoint.

  Returns:
    (out_dir, layers).

  Raises:
    ValueError: layers out of range, repeated or not increasing.
  """
  with tempfile.TemporaryDirectory() as tmp:
    source = _teacher_dir(teacher, which, tmp)
    cfg = hf.read_config(source)
    layers = tuple(layers or every_other(cfg.num_hidden_layers))
    if (not layers or list(layers) != sorted(set(layers))
        or layers[0] < 1 or layers[-1] > cfg.num_hidden_layers):
      raise ValueError(
          f"--layers={','.join(map(str, layers))}: increasing teacher layers "
          f"in 1..{cfg.num_hidden_layers}")
    tensors, _ = hf.read_weights(source)
    new_index = {t - 1: i for i, t in enumerate(layers)}
    out = {}
    for key, value in tensors.items():
      m = _LAYER.search(key)
      if m is None:
        out[key] = value
      elif int(m.group(2)) in new_index:
        i = new_index[int(m.group(2))]
        out[key[:m.start(2)] + str(i) + key[m.end(2):]] = value
    raw = json.loads((source / "config.json").read_text())
    raw["num_hidden_layers"] = len(layers)
    return _write(out_dir, out, raw, source), layers


def fresh(teacher: str, out_dir, shape: dict, seed: int = 0,
          which: str = "best"):
  """Writes a randomly initialised encoder: the teacher's config with
  `shape`'s fields changed (its vocabulary and tokenizer)."""
  with tempfile.TemporaryDirectory() as tmp:
    source = _teacher_dir(teacher, which, tmp)
    cfg = hf.read_config(source).replace(**shape)
    model = create_model(heads.SequenceClassification, cfg, 2, seed=seed)
    hf.export(model, tmp + "/fresh")
    tensors, _ = hf.read_weights(pathlib.Path(tmp) / "fresh")
    encoder = {k: v for k, v in tensors.items() if k.startswith(
        cfg.model_type + ".")}
    raw = json.loads((pathlib.Path(tmp) / "fresh" / "config.json").read_text())
    for key in ("architectures", "id2label", "label2id"):
      raw.pop(key, None)
    return _write(out_dir, encoder, raw, source)


def parse_shape(text: str) -> dict:
  """"hidden_size=192,num_hidden_layers=4" -> {field: int or float}."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, sep, value = part.partition("=")
    if not sep:
      raise ValueError(f"--shape: expected field=value, got {part!r}")
    out[key.strip()] = float(value) if "." in value else int(value)
  return out


def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("teacher", None, "A Hugging Face directory or alias, "
                      "or a research.train workdir.")
  flags.DEFINE_string("out", None, "The student's directory.")
  flags.DEFINE_string("layers", "", "Teacher layers kept, 1-based, e.g. "
                      "2,4,6; default one in two ending with the top.")
  flags.DEFINE_string("shape", "", "A fresh student instead: BertConfig "
                      "fields changed, e.g. hidden_size=192,num_hidden_layers=4")
  flags.DEFINE_integer("seed", 0, "Initialisation seed of a fresh student.")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "A workdir "
                    "teacher's checkpoint.")
  flags.mark_flags_as_required(["teacher", "out"])

  def run(argv):
    del argv
    f = flags.FLAGS
    try:
      if f.shape:
        if f.layers:
          raise ValueError("--layers and --shape: give one (layers taken "
                           "from the teacher, or a fresh shape)")
        out = fresh(f.teacher, f.out, parse_shape(f.shape), f.seed, f.which)
        print(f"wrote a fresh student ({f.shape}) to {out}")
      else:
        layers = [int(x) for x in f.layers.split(",")] if f.layers else None
        out, layers = from_layers(f.teacher, f.out, layers, f.which)
        print(f"wrote a student of teacher layers "
              f"{', '.join(map(str, layers))} to {out}")
    except (FileNotFoundError, ValueError, TypeError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(run)


if __name__ == "__main__":
  main()
