"""Compresses a finished run's model after training, scores it, writes it out.

    python -m research.compress --workdir RUN --quantize int8
    python -m research.compress --workdir RUN --quantize int8_weights --out DIR
    python -m research.compress --workdir RUN --prune_heads 0.5 --out DIR
    python -m research.compress --workdir RUN          # sparsity report only

Restores the run's model (`--which`: latest, the default, or best), then:

  --prune_heads F  removes the fraction F of attention heads with the lowest
                   importance (Michel et al. 2019, measured on
                   `--importance_examples` training examples;
                   `research.methods.pruning.heads`), which shrinks every
                   attention matmul (`BertModel.prune_heads`);
  --quantize S     int8 post-training quantisation of the dense layers with
                   qwix (`research.methods.quantization.int8`): `int8`
                   (weights and activations) or `int8_weights`. A QAT run
                   (method `qat`) is quantised the same way.

and evaluates the result with the run's own evaluators on its dev split(s),
printing the metrics, the parameters (non-zero), the size on disk of its
state and the sparsity of every dense layer of the encoder. `--out` writes
`compression.json` (all of that) and the model: a Hugging Face directory
that transformers loads when the format can hold it (a head-pruned model:
its removed heads as zeros plus config.json's `pruned_heads`, which
`research.models.hf` reads back as a pruned model; a mean-, cls- or
max-pooled classifier: a sentence-transformers directory, as
`research.export` writes it, which has no place for removed heads), else
the quantised state (`model.int8.safetensors`; qwix's layout, not a stable
format: keep the float32 export and quantise at load).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile

import ml_collections
import numpy as np

from research import data, evaluators, export, restore
from research.methods.pruning import heads as heads_lib
from research.methods.pruning import layers as pruning_layers
from research.methods.quantization import int8
from research.models import hf

log = logging.getLogger("research.compress")


@dataclasses.dataclass
class Compressed:
  """A run's model after compression (`compress`).

  Attributes:
    restored: the run as `restore.restore_run` gave it (config, task, step).
    model: the compressed model (an `nnx.Module`).
    splits: the run's evaluation splits, {name: TokenizedSplit}.
    info: what was done: `quantize`, `pruned_heads`, `head_importance`.
  """
  restored: restore.Restored
  model: object
  splits: dict
  info: dict

  def as_restored(self) -> restore.Restored:
    """The compressed model in `restore.Restored`'s form (for evaluators)."""
    return self.restored.with_model(self.model)


def load_splits(workdir, config, task, tokenizer, training=False):
  """The run's evaluation splits (and training split), from its cache."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  if not training:
    cfg.data.train_split, cfg.data.train_file = "", ""
  label_names = data.load_label_names(os.path.join(workdir, "labels.json"))
  train_split, splits, _, _ = data.load_splits(
      cfg, tokenizer, cache_dir=os.path.join(workdir, "cache"),
      label_names=label_names or None, task=task)
  return train_split, splits


def compress(workdir: str, *, which: str = "latest", quantize: str = "",
             prune_heads: float = 0.0, importance_examples: int = 512,
             batch_size: int = 32) -> Compressed:
  """A run's model, exported and reloaded, then head-pruned, then quantised.

  The model compressed is the run's Hugging Face export
  (`research.export.export_run`: pruning masks folded into the kernels, a
  QAT run's float32 weights) loaded back as a plain model: what is scored
  and benchmarked is what a user of the export gets.

  Args:
    workdir: a `research.train` workdir.
    which: "latest" or "best" checkpoint.
    quantize: "" (none) or a scheme of `int8.SCHEMES`.
    prune_heads: the fraction of heads removed (0: none).
    importance_examples: training examples that score the heads.
    batch_size: examples per importance batch.
  """
  if quantize:
    int8.check_scheme(quantize, "--quantize")
  config = restore.read_config(workdir)
  tokenizer = data.load_tokenizer(str(hf.resolve(config.model.name)))
  restored = restore.restore_run(workdir, which, tokenizer)
  with tempfile.TemporaryDirectory() as tmp:
    with contextlib.redirect_stdout(io.StringIO()):
      export.export_run(workdir, tmp, which)
    # auto: the export's own pooling (a sentence-transformers directory's
    # Pooling module for a mean/cls/max-pooled run), else BERT's pooler.
    model, _ = hf.load_pretrained(tmp, restored.task.HEAD,
                                  restored.task.num_outputs(), pooling="auto")
  train_split, splits = load_splits(workdir, config, restored.task, tokenizer,
                                    training=prune_heads > 0)
  info = {"workdir": workdir, "step": restored.step, "which": restored.which,
          "quantize": quantize, "prune_heads": prune_heads}
  if prune_heads > 0:
    batcher = data.Batcher(train_split, batch_size, tuple(config.data.buckets),
                           shuffle=True, seed=config.seed)
    n = min(max(1, importance_examples // batch_size), batcher.steps_per_epoch)
    importance = heads_lib.head_importance(
        model, restored.task, (batcher.batch_at(i) for i in range(n)))
    chosen = heads_lib.choose(heads_lib.normalize(importance), prune_heads)
    model.bert.prune_heads(chosen)
    info.update(pruned_heads={str(k): v for k, v in chosen.items()},
                head_importance=importance.round(6).tolist(),
                importance_examples=n * batch_size)
  if quantize:
    model = int8.ptq(model, quantize)
  return Compressed(restored, model, splits, info)


def evaluate(compressed: Compressed, batch_size: int = 0) -> dict:
  """The run's evaluators on the compressed model: {metric: value}."""
  restored = compressed.as_restored()
  config = restored.config
  names = evaluators.configs(config, restored.task)
  results = {}
  for name, ecfg in names.items():
    options = evaluators.options(name, ecfg)
    cls = evaluators.module(ecfg["type"], name).Evaluator
    evaluator = restored.make_evaluator(
        compressed.splits[options.pop("split")],
        batch_size or config.eval_batch_size, tuple(config.data.buckets),
        name=name, cls=cls, **options)
    prefix = evaluators.prefix(name, list(names))
    for metric, value in evaluator.run(restored.params, restored.frozen).items():
      results[prefix + metric] = float(value)
  return results


def nonzero_parameters(model) -> int:
  """Parameters of the model that are not zero (quantised ones counted once)."""
  total = 0
  for name, array in int8.flat_arrays(model).items():
    if name.endswith("/scale"):
      continue  # quantisation scales
    total += int(np.count_nonzero(array))
  return total


def report(compressed: Compressed, batch_size: int = 0) -> dict:
  """Metrics, parameters, size on disk and sparsity of a compressed model."""
  out = dict(compressed.info)
  out["metrics"] = evaluate(compressed, batch_size)
  out["parameters_nonzero"] = nonzero_parameters(compressed.model)
  out["size_bytes"] = int8.size_on_disk(compressed.model)
  if not compressed.info["quantize"]:  # (int8 kernels are not arrays)
    out["sparsity"] = pruning_layers.sparsity(compressed.model)
  return out


def write(compressed: Compressed, result: dict, out_dir: str) -> str:
  """compression.json and the model (module docstring) under `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  if compressed.info["quantize"]:
    int8.save_state(compressed.model, os.path.join(out_dir, "model.int8.safetensors"))
  else:
    config = compressed.restored.config
    workdir = compressed.info["workdir"]
    labels = data.load_label_names(os.path.join(workdir, "labels.json"))
    export.write_model(compressed.model, out_dir,
                       compressed.restored.task.HEAD,
                       tokenizer_dir=hf.resolve(config.model.name),
                       label_names=labels or None,
                       max_length=config.data.max_length, where=workdir)
  with open(os.path.join(out_dir, "compression.json"), "w") as f:
    json.dump(result, f, indent=2)
  return out_dir


def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "The run's workdir.")
  flags.DEFINE_string("out", "", "Write compression.json and the model here.")
  flags.DEFINE_enum("which", "latest", ["best", "latest"], "Which checkpoint.")
  flags.DEFINE_string("quantize", "", "int8 | int8_weights (empty: none).")
  flags.DEFINE_float("prune_heads", 0.0, "Fraction of attention heads removed.")
  flags.DEFINE_integer("importance_examples", 512,
                       "Training examples that score the heads.")
  flags.DEFINE_integer("batch_size", 0, "Evaluation batch (0: the run's).")
  flags.mark_flags_as_required(["workdir"])

  def run(argv):
    del argv
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("absl", "orbax", "jax._src"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    f = flags.FLAGS
    try:
      compressed = compress(f.workdir, which=f.which, quantize=f.quantize,
                            prune_heads=f.prune_heads,
                            importance_examples=f.importance_examples)
      result = report(compressed, f.batch_size)
      if f.out:
        write(compressed, result, f.out)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    result.pop("head_importance", None)
    print(json.dumps(result, indent=2))
  app.run(run)


if __name__ == "__main__":
  main()
