"""Hugging Face PEFT adapter directories: export ours, import theirs.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`
(keys `base_model.model.<module>.lora_A.weight`, ...), loaded onto a
`transformers` model by `peft.PeftModel.from_pretrained(base, dir)`. The
module names come from the same name maps as full checkpoints
(`research.models.hf.key_map`): our layer at `("bert", "layers", 0,
"attention", "query")` is PEFT's `bert.encoder.layer.0.attention.self.query`.
Our A [in, r] and B [r, out] are PEFT's `lora_A.weight` [r, in] and
`lora_B.weight` [out, r] transposed (inputs and outputs flattened in the
order `hf.export` flattens attention heads); AdaLoRA's lambda [r] is
`lora_E` [r, 1]. The task head is saved as PEFT's `modules_to_save`.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from flax import nnx

from research.methods import peft
from research.models import hf, head_class, make_dense
from research.methods.peft import layers
from research.models import heads

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {"SequenceClassification": "SEQ_CLS",
              "TokenClassification": "TOKEN_CLS",
              "QuestionAnswering": "QUESTION_ANS"}
# adapter_config.json fields whose non-default values we cannot reproduce.
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
               "lora_bias": False, "bias": "none", "layers_to_transform": None,
               "layer_replication": None, "target_parameters": None,
               "trainable_token_indices": None}


def _module_names(model, task=None) -> dict:
  """{our layer path: PEFT module name} for every dense layer of `model`."""
  return _module_names_for(type(model) if task is None else head_class(task),
                           model.cfg)


def _head_modules(model, task=None) -> list[str]:
  head = type(model) if task is None else head_class(task)
  return sorted({k.split(".")[0] for k in hf.head_key_map(head, model.cfg)})


def _pooler_keys(head, cfg, options) -> dict:
  """BERT's pooler names, when the method trained it (`pooler=True`) and
  the head does not already hold it (RoBERTa's `classifier.dense`)."""
  if not (options or {}).get("pooler"):
    return {}
  own = hf.head_key_map(head, cfg)
  return {k: v for k, v in hf.key_map(head, cfg).items()
          if tuple(v[0][:2]) == ("bert", "pooler") and k not in own}


def _saved_key_map(head, cfg, options) -> dict:
  """HF name -> (our path, kind) of what PEFT's `modules_to_save` holds: the
  head (outside the encoder) and, if trained, the pooler."""
  return {**{k: v for k, v in hf.head_key_map(head, cfg).items()
             if v[0][0] != "bert" or (options or {}).get("pooler")},
          **_pooler_keys(head, cfg, options)}


def _target_regex(modules) -> str:
  """A PEFT `target_modules` regex matching exactly these module names."""
  patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.",
                            re.escape(m).replace(r"\.", "\\.")) for m in modules})
  return "(" + "|".join(patterns) + ")"


def export(model: nnx.Module, out_dir, *, task=None, options: dict | None = None,
           base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes the model's LoRA or AdaLoRA adapters and head as a PEFT directory.

  Args:
    model: a model built with `LoRADense` or `AdaLoRADense` layers (not
      merged).
    out_dir: the directory to write (created).
    task: the head class or task name (default: the model's class).
    options: the method's options (`config.method_options.<name>`), for
      the config fields PEFT reads (alpha, dropout, AdaLoRA's schedule).
    base_model_name_or_path: recorded in adapter_config.json.

  Returns:
    The directory.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  options = dict(options or {})
  pooling = getattr(model.bert, "pooling", None)
  if pooling not in (None, "pooler"):
    raise ValueError(
        f"config.model.pooling resolved to {pooling!r}: a PEFT directory "
        "loads onto a transformers BertFor* model, which pools with BERT's "
        "pooler, so the adapters would be read through another pooling. "
        "Export this run merged instead (research.export without --peft: a "
        "sentence-transformers directory), or train with "
        "--config.model.pooling=pooler")
  found = layers.low_rank_layers(model)
  if not found:
    raise ValueError("the model has no LoRA or AdaLoRA layers to export")
  kinds = {type(layer) for _, layer in found}
  if len(kinds) > 1:
    raise ValueError("the model mixes LoRA and AdaLoRA layers; PEFT stores one kind")
  ada = kinds == {layers.AdaLoRADense}
  names = _module_names(model, task)
  tensors, modules = {}, []
  for path, layer in found:
    if layer.merged:
      raise ValueError(f"layer {'.'.join(map(str, path))} is merged; unmerge "
                       "it before exporting its adapter")
    module = names[tuple(path)]
    modules.append(module)
    key = PREFIX + module
    if ada:
      tensors[key + ".lora_A"] = np.asarray(layer.lora_a[...]).T
      tensors[key + ".lora_E"] = np.asarray(layer.lora_e[...])[:, None]
      tensors[key + ".lora_B"] = np.asarray(layer.lora_b[...]).T
    else:
      tensors[key + ".lora_A.weight"] = np.asarray(layer.lora.lora_a[...]).T
      tensors[key + ".lora_B.weight"] = np.asarray(layer.lora.lora_b[...]).T
  head = type(model) if task is None else head_class(task)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for hf_key, (path, kind) in _saved_key_map(head, model.cfg, options).items():
    if path in flat:
      tensors[PREFIX + hf_key] = hf._to_hf(kind, np.asarray(flat[path][...], np.float32))  # pylint: disable=protected-access
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  rank = layers.low_rank_layers(model)[0][1]
  config = {
      "peft_type": "ADALORA" if ada else "LORA",
      "task_type": TASK_TYPES.get(head.hf_architecture.replace("For", "", 1)),
      "base_model_name_or_path": base_model_name_or_path,
      "target_modules": _target_regex(modules),
      "modules_to_save": _head_modules(model, task)
                         + (["pooler"] if _pooler_keys(head, model.cfg, options)
                            else []),
      "lora_alpha": rank.alpha,
      "lora_dropout": float(options.get("dropout", 0.0)),
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": True, "use_dora": False, "use_rslora": False,
      "rank_pattern": {}, "alpha_pattern": {},
  }
  if ada:
    r = int(rank.lora_e.shape[0])
    if not options.get("total_step"):
      raise ValueError("PEFT's AdaLoraConfig needs total_step: pass the run's "
                       "number of updates in options['total_step']")
    config.update(
        init_r=r, target_r=int(options.get("target_r", r)),
        tinit=int(options.get("tinit", 0)), tfinal=int(options.get("tfinal", 0)),
        deltaT=int(options.get("delta_t", 1)),
        beta1=float(options.get("beta1", 0.85)),
        beta2=float(options.get("beta2", 0.85)),
        orth_reg_weight=float(options.get("orth_reg_weight", 0.5)),
        total_step=int(options["total_step"]), rank_pattern=None)
  else:
    config["r"] = int(rank.lora.lora_a.shape[1])
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(out / WEIGHTS_FILE),
                              metadata={"format": "pt"})
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  return out


def read_config(adapter_dir) -> dict:
  """adapter_config.json, checked for what we can load (CheckpointError)."""
  path = pathlib.Path(adapter_dir) / CONFIG_FILE
  if not path.is_file():
    raise hf.CheckpointError(f"{path}: not found (a PEFT adapter directory "
                             f"holds {CONFIG_FILE} and {WEIGHTS_FILE})")
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise hf.CheckpointError(f"{path}: not valid JSON ({e})") from None
  if config.get("peft_type") not in ("LORA", "ADALORA"):
    raise hf.CheckpointError(f"{path}: peft_type {config.get('peft_type')!r}; "
                             "supported: LORA, ADALORA")
  for field, default in UNSUPPORTED.items():
    if config.get(field, default) not in (default, None, False, [], {}):
      raise hf.CheckpointError(f"{path}: {field}={config[field]!r} is not "
                               f"supported (only {default!r})")
  for field in ("rank_pattern", "alpha_pattern"):
    if config.get(field):
      raise hf.CheckpointError(f"{path}: a non-empty {field} is not supported")
  return config


def load(adapter_dir, base: str, task=heads.SequenceClassification,
         num_labels: int = 2, **load_kw):
  """Our model with a PEFT LoRA/AdaLoRA directory's adapters and head.

  Args:
    adapter_dir: the PEFT directory.
    base: the base checkpoint (alias, directory; see `hf.resolve`).
    task, num_labels: the head, as `hf.load_pretrained`.
    load_kw: more `hf.load_pretrained` arguments (dtype, seed, ...).

  Returns:
    (model, hf.LoadReport of the adapter file).

  Raises:
    CheckpointError: an unsupported config, or adapter weights missing for
      a layer the directory's config targets.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  config = read_config(adapter_dir)
  source = pathlib.Path(adapter_dir) / WEIGHTS_FILE
  tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v
             for k, v in safetensors.numpy.load_file(str(source)).items()}
  ada = config["peft_type"] == "ADALORA"
  suffix = ".lora_A" if ada else ".lora_A.weight"
  modules = sorted(k[:-len(suffix)] for k in tensors if k.endswith(suffix))
  cfg = hf.read_config(hf.resolve(base))
  ours = {v: k for k, v in _module_names_for(task, cfg).items()}
  unknown = [m for m in modules if m not in ours]
  if unknown:
    raise hf.CheckpointError(f"{source}: adapters on modules our model does "
                             f"not have: {', '.join(unknown)}")
  # Our layer names ("attention.query", "pooler") of the adapted modules.
  targets = {".".join(map(str, ours[m][3:] if ours[m][1] == "layers"
                          else ours[m][1:])) for m in modules}
  r = int(config.get("init_r") if ada else config["r"])
  factory = peft.targeted_factory(
      make_dense, targets, layers.AdaLoRADense if ada else layers.LoRADense,
      match=lambda name, t: name in t, lora_rank=r,
      lora_alpha=float(config.get("lora_alpha", r)))
  model, _ = hf.load_pretrained(base, task, num_labels, dense_factory=factory,
                                **load_kw)
  names = {}
  for m in modules:
    path = ours[m]
    if ada:
      tensors[m + ".lora_E"] = tensors[m + ".lora_E"].reshape(-1)
      names.update({m + ".lora_A": (path + ("lora_a",), "linear"),
                    m + ".lora_E": (path + ("lora_e",), "copy"),
                    m + ".lora_B": (path + ("lora_b",), "linear")})
    else:
      names.update({m + ".lora_A.weight": (path + ("lora", "lora_a"), "linear"),
                    m + ".lora_B.weight": (path + ("lora", "lora_b"), "linear")})
  # The head, and the pooler where the directory saved it.
  names.update({k: v for k, v in {**hf.head_key_map(task, cfg),
                                  **_pooler_keys(task, cfg, {"pooler": True})}.items()
                if k in tensors})
  report = hf.assign(model, tensors, names, cfg, source)
  adapted = {tuple(p) for p, _ in layers.low_rank_layers(model)}
  missing = [k for k, (p, _) in names.items() if k not in report.loaded]
  if missing or len(adapted) != len(modules):
    raise hf.CheckpointError(
        f"{source}: adapter weights missing for "
        + ", ".join(missing or sorted(map(str, adapted - {ours[m] for m in modules}))))
  report.missing = []  # the base weights come from `base`, not from here
  return model, report


def _module_names_for(task, cfg) -> dict:
  """{our layer path: PEFT module name} for a head class and config."""
  out = {}
  for hf_key, (path, _) in hf.key_map(task, cfg).items():
    if path[-1] == "kernel" and hf_key.endswith(".weight"):
      out[path[:-1]] = hf_key[:-len(".weight")]
  return out
