"""Portable exports of a run: ONNX (jax2onnx) and StableHLO (jax.export).

    python -m research.export --workdir /tmp/quickstart --out /tmp/qs_onnx --format onnx
    python -m research.export --workdir /tmp/quickstart --out /tmp/qs_hlo --format stablehlo

Both export the function the server runs (`research.serve.backends.model_fn`:
the task's own forward of the restored model, trained part merged with the
frozen one) with a dynamic batch and length: inputs `input_ids`,
`attention_mask`, `token_type_ids`, int32 [batch, length]; outputs the
head's (float32 logits [batch, num_labels], [batch, length, num_labels] or
[batch, length, vocab], QA's start and end [batch, length]).

- ONNX (`model.onnx`, opset 23): the weights are initialisers. The export
  is checked at once: onnxruntime's outputs on a random batch must equal
  the JAX model's within 1e-4 (`check_onnx`).
- StableHLO (`model.stablehlo`, `jax.export`'s serialisation, symbolic
  `batch` and `length`; loads with `jax.export.deserialize` in any JAX of a
  compatible version, on CPU, GPU or TPU): the weights are its first
  argument, a list of arrays, stored in `weights.safetensors`.

Beside the model: the tokenizer files and `serve.json` (the run's config,
label names, summary and model version), so that
`python -m research.serve --model_dir DIR` serves it with no checkpoint.
Adapter and prefix-tuning runs export too: the function is the model's own.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

ONNX_FILE = "model.onnx"
STABLEHLO_FILE = "model.stablehlo"
WEIGHTS_FILE = "weights.safetensors"
FORMATS = ("hf", "onnx", "stablehlo")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OPSET = 23
PARITY_ATOL = 1e-4


def _symbolic_inputs():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  batch, length = jax.export.symbolic_shape("batch, length")
  return [jax.ShapeDtypeStruct((batch, length), jnp.int32)] * 3


def _split_weights(params, frozen):
  """(weights, rebuild): the model parts' array leaves, and
  `rebuild(weights) -> (params, frozen)` (other leaves stay constants)."""
  import jax  # pylint: disable=import-outside-toplevel
  leaves, treedef = jax.tree.flatten((params, frozen))
  is_weight = [hasattr(l, "dtype") and not jax.dtypes.issubdtype(
      l.dtype, jax.dtypes.prng_key) for l in leaves]
  weights = [l for l, w in zip(leaves, is_weight) if w]

  def rebuild(new):
    it = iter(new)
    return jax.tree.unflatten(
        treedef, [next(it) if w else l for l, w in zip(leaves, is_weight)])

  return weights, rebuild


def sample_inputs(vocab_size, batch=2, length=16, seed=0):
  """A random int32 batch with some padding (for parity checks)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, min(vocab_size, 2000), (batch, length)).astype(
      np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[0, length // 2:] = 0
  ids[0, length // 2:] = 0
  return ids, mask, np.zeros((batch, length), np.int32)


def onnx_model(fn, model_name="research_bert"):
  """The ONNX ModelProto of `fn(input_ids, attention_mask, token_type_ids)`
  with dynamic batch and length axes.

  jax2onnx 0.17 replaces `nnx.Dropout.__call__` while it traces, dropping
  its `rngs` argument, which our layers pass; so the function is traced to
  a jaxpr first (primitives only, symbolic shapes kept) and jax2onnx
  converts that.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.extend  # pylint: disable=import-outside-toplevel
  import jax2onnx  # pylint: disable=import-outside-toplevel
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # per-constant notes
  specs = _symbolic_inputs()
  closed = jax.make_jaxpr(fn)(*specs)
  outputs = len(closed.out_avals)
  flat = jax.extend.core.jaxpr_as_fun(closed)
  names = (["logits"] if outputs == 1 else
           [f"logits_{i}" for i in range(outputs)])
  return jax2onnx.to_onnx(lambda *a: tuple(flat(*a)), specs,
                          model_name=model_name, opset=ONNX_OPSET,
                          input_names=list(INPUTS), output_names=names)


def check_onnx(path, fn, vocab_size, atol=PARITY_ATOL) -> float:
  """onnxruntime vs the JAX function on random batches of two shapes.

  Returns:
    The largest absolute difference of any output.

  Raises:
    ValueError: a difference above `atol`.
  """
  from research.serve.backends import OnnxBackend  # pylint: disable=import-outside-toplevel
  backend = OnnxBackend(path)
  worst = 0.0
  for batch, length in ((1, 7), (3, 16)):
    arrays = sample_inputs(vocab_size, batch, length)
    for ours, theirs in zip(fn(*arrays), backend(*arrays)):
      worst = max(worst, float(np.abs(np.asarray(ours) - theirs).max()))
  if worst > atol:
    raise ValueError(f"{path}: onnxruntime differs from JAX by {worst:.3g} "
                     f"(> {atol})")
  return worst


def stablehlo_export(forward, params, frozen):
  """`jax.export.Exported` of `forward(weights, input_ids, attention_mask,
  token_type_ids)` and the weights (a list of arrays)."""
  import jax  # pylint: disable=import-outside-toplevel
  weights, rebuild = _split_weights(params, frozen)

  def fn(weights, input_ids, attention_mask, token_type_ids):
    return forward(*rebuild(weights), input_ids, attention_mask,
                   token_type_ids)

  specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
  exported = jax.export.export(jax.jit(fn))(specs, *_symbolic_inputs())
  return exported, weights


def read_stablehlo(directory):
  """(jax.export.Exported, weights) of a --format stablehlo directory."""
  import jax  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  with open(os.path.join(directory, STABLEHLO_FILE), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  stored = load_file(os.path.join(directory, WEIGHTS_FILE))
  return exported, [stored[k] for k in sorted(stored)]


def export_restored(restored, workdir, out_dir, fmt, *, version=None,
                    check=True) -> dict:
  """Writes a restored run as ONNX or StableHLO plus what serving needs.

  Args:
    restored: `research.restore.restore_run`'s result.
    workdir: the run's workdir (labels.json, summary.json).
    out_dir: the directory to write.
    fmt: "onnx" or "stablehlo".
    version: the model version to record (default: research.serve's).
    check: ONNX: compare onnxruntime with JAX (`check_onnx`).

  Returns:
    serve.json's content.
  """
  from research import data  # pylint: disable=import-outside-toplevel
  from research.serve import engine  # pylint: disable=import-outside-toplevel
  from research.serve.backends import model_fn  # pylint: disable=import-outside-toplevel
  if fmt not in ("onnx", "stablehlo"):
    raise ValueError(f"--format={fmt!r}; valid: {', '.join(FORMATS)}")
  os.makedirs(out_dir, exist_ok=True)
  forward = model_fn(restored.task, restored.graphdef)
  params, frozen = restored.params, restored.frozen
  fn = lambda *arrays: forward(params, frozen, *arrays)  # pylint: disable=unnecessary-lambda-assignment
  version = version or (
      f"{os.path.basename(os.path.normpath(workdir))}:{restored.which}"
      f"@{restored.step}:{engine.params_digest(params)}")
  meta = {"format": fmt, "version": version, "inputs": list(INPUTS),
          "dynamic_axes": ["batch", "length"],
          "config": restored.config.to_dict(),
          "label_names": list(data.load_label_names(
              os.path.join(workdir, "labels.json"))),
          "summary": engine._read_json(  # pylint: disable=protected-access
              os.path.join(workdir, "summary.json"), {})}
  if fmt == "onnx":
    import onnx  # pylint: disable=import-outside-toplevel
    path = os.path.join(out_dir, ONNX_FILE)
    onnx.save_model(onnx_model(fn), path)
    meta.update(file=ONNX_FILE, opset=ONNX_OPSET)
    if check:
      vocab = restored.model.bert.cfg.vocab_size if hasattr(
          restored.model, "bert") else 2000
      meta["max_abs_diff_vs_jax"] = check_onnx(path, fn, vocab)
  else:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    exported, weights = stablehlo_export(forward, params, frozen)
    with open(os.path.join(out_dir, STABLEHLO_FILE), "wb") as f:
      f.write(exported.serialize())
    save_file({f"w{i:05d}": np.asarray(w) for i, w in enumerate(weights)},
              os.path.join(out_dir, WEIGHTS_FILE))
    meta.update(file=STABLEHLO_FILE, weights=WEIGHTS_FILE)
  restored.task.tokenizer.save_pretrained(out_dir)
  with open(os.path.join(out_dir, engine.SERVE_JSON), "w",
            encoding="utf-8") as f:
    json.dump(meta, f, indent=2, default=float)
  return meta


def export_run(workdir, out_dir, fmt, which="best") -> dict:
  """`export_restored` of a workdir's best (or latest) checkpoint."""
  from research import data, restore  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  config = restore.read_config(workdir)
  tokenizer = data.load_tokenizer(str(hf.resolve(config.model.name)))
  restored = restore.restore_run(workdir, which, tokenizer)
  meta = export_restored(restored, workdir, out_dir, fmt)
  extra = (f"; onnxruntime vs JAX: max |diff| {meta['max_abs_diff_vs_jax']:.2g}"
           if "max_abs_diff_vs_jax" in meta else "")
  print(f"exported step {restored.step} ({restored.which}) as {fmt} to "
        f"{out_dir}{extra}")
  return meta
