"""int8 quantisation (qwix), attention-head pruning, research.compress."""

import json
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from research.methods.pruning import heads
from research.methods.quantization import int8
from research.models import BertConfig, create_model, hf

qwix = pytest.importorskip("qwix")


def _model(seed=0, vocab=100):
  cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=64)
  model = create_model("sequence_classification", cfg, 3, seed=seed)
  # A trained classifier's logits are O(1), not a fresh head's O(0.02).
  model.classifier.kernel[...] = model.classifier.kernel[...] * 100
  return model


def _inputs(batch=8, length=12, vocab=100):
  ids = jax.random.randint(jax.random.key(1), (batch, length), 1, vocab)
  mask = np.ones((batch, length), np.int32)
  mask[0, 7:] = 0
  return ids, jnp.asarray(mask)


# Tolerances: per-channel absmax int8 rounds each weight by at most
# max|w| / 254 (activations per token alike); through two layers this
# tiny model's logits moved by 1.3% (int8) and 0.7% (weights only) of
# their largest magnitude.
TOLERANCE = {"int8": 0.03, "int8_weights": 0.015}


@pytest.mark.parametrize("scheme", list(int8.SCHEMES))
def test_ptq_logits_within_tolerance_of_fp32(scheme):
  model = _model()
  ids, mask = _inputs()
  ref = np.asarray(model(ids, mask))
  quantised = int8.ptq(model, scheme)
  out = np.asarray(quantised(ids, mask))
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert 0 < err < TOLERANCE[scheme], err
  # The weights are stored int8 (every dense layer: 6 per layer, pooler,
  # classifier) and the matmuls run on them.
  stored = int8.flat_arrays(quantised)
  qvalues = [k for k, v in stored.items() if v.dtype == np.int8]
  assert len(qvalues) == 2 * 6 + 2, qvalues
  jaxpr = str(jax.make_jaxpr(lambda a, b: quantised(a, b))(ids, mask))
  int_dots = re.findall(r"i32\[[\d,]*\] = dot_general", jaxpr)
  assert len(int_dots) == (14 if scheme == "int8" else 0)
  # The original model is untouched.
  np.testing.assert_array_equal(np.asarray(model(ids, mask)), ref)


def test_int8_state_is_smaller_on_disk():
  model = _model()
  quantised = int8.ptq(model)
  fp32, q = int8.size_on_disk(model), int8.size_on_disk(quantised)
  dense = sum(v.size for k, v in int8.flat_arrays(model).items()
              if k.endswith("kernel"))
  scales = sum(v.size for k, v in int8.flat_arrays(quantised).items()
               if k.endswith("scale"))
  # Each dense weight goes from 4 bytes to 1, plus a float32 scale per
  # output channel (and the file header's longer names).
  assert fp32 - q == pytest.approx(3 * dense - 4 * scales, abs=1500)


@pytest.mark.parametrize("scheme", list(int8.SCHEMES))
def test_qat_forward_is_the_served_int8_model(scheme):
  """What QAT trains (fake quantisation) is what PTQ of its weights serves."""
  model = _model()
  ids, mask = _inputs()
  trained = np.asarray(int8.qat(model, scheme)(ids, mask))
  served = np.asarray(int8.ptq(model, scheme)(ids, mask))
  np.testing.assert_allclose(trained, served, rtol=1e-6, atol=1e-6)
  assert not np.array_equal(trained, np.asarray(model(ids, mask)))


@pytest.mark.slow
def test_qat_trains_and_its_weights_quantise(tmp_path, tiny_model_dir):
  from tests.test_pruning import _config  # pylint: disable=import-outside-toplevel
  from research import compress, restore, train  # pylint: disable=import-outside-toplevel
  config = _config(tiny_model_dir, "qat", steps=4, scheme="int8")
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary["eval/loss"])
  restored = restore.restore_run(str(tmp_path), "latest")
  ids, mask = _inputs(vocab=30000)
  trained = np.asarray(restored.model(ids, mask))
  compressed = compress.compress(str(tmp_path), quantize="int8")
  served = np.asarray(compressed.model(ids, mask))
  np.testing.assert_allclose(trained, served, rtol=1e-5, atol=1e-5)


def test_a_mean_pooled_run_compresses_and_exports_as_it_trained(
    tmp_path, tiny_model_dir):
  """The export's own pooling comes back with it: a mean-pooled run's
  compressed model gives the run's logits (its reload once pooled with
  BERT's pooler under the trained classifier: 0.58 dev accuracy for a 0.92
  quickstart run), and writes a sentence-transformers directory."""
  from tests.test_pruning import _config  # pylint: disable=import-outside-toplevel
  from research import compress, restore, train  # pylint: disable=import-outside-toplevel
  config = _config(tiny_model_dir, "bitfit", steps=2)
  config.methods, config.method_options = (), {}
  config.model.pooling = "mean"
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  restored = restore.restore_run(workdir, "latest")
  ids, mask = _inputs(vocab=30000)
  compressed = compress.compress(workdir)
  assert compressed.model.bert.pooling == "mean"
  np.testing.assert_allclose(np.asarray(compressed.model(ids, mask)),
                             np.asarray(restored.model(ids, mask)),
                             rtol=1e-5, atol=1e-6)
  out = tmp_path / "out"
  compress.write(compressed, compress.report(compressed), str(out))
  assert (out / "1_Pooling" / "config.json").is_file()
  assert (out / "2_Dense" / "model.safetensors").is_file()
  pruned = compress.compress(workdir, prune_heads=0.5, importance_examples=16,
                             batch_size=16)
  with pytest.raises(ValueError, match="mean-pooled model with heads removed"):
    compress.write(pruned, {}, str(tmp_path / "pruned"))


# --- Head pruning -------------------------------------------------------------


def test_pruning_heads_removes_exactly_those_heads():
  model, reference = _model(), _model()
  ids, mask = _inputs()
  chosen = {0: [1, 3], 1: [2]}
  before = {i: {n: np.asarray(getattr(l.attention, n).kernel[...])
                for n in ("query", "key", "value", "output")}
            for i, l in enumerate(model.bert.layers)}
  model.bert.prune_heads(chosen)
  assert model.bert.pruned_heads == {0: (1, 3), 1: (2,)}
  for i, removed in chosen.items():
    kept = [h for h in range(4) if h not in removed]
    att = model.bert.layers[i].attention
    for n in ("query", "key", "value"):  # [embed, heads, kv]
      np.testing.assert_array_equal(np.asarray(getattr(att, n).kernel[...]),
                                    before[i][n][:, kept])
    np.testing.assert_array_equal(np.asarray(att.output.kernel[...]),
                                  before[i]["output"][kept])
  # The same function as the full model with those heads' outputs zeroed.
  for i, removed in chosen.items():
    out = reference.bert.layers[i].attention.output
    out.kernel[...] = out.kernel[...].at[jnp.asarray(removed)].set(0.0)
  np.testing.assert_allclose(np.asarray(model(ids, mask)),
                             np.asarray(reference(ids, mask)), atol=1e-5)
  # Again with the same heads: nothing changes; every head of a layer: error.
  model.bert.prune_heads({0: [1]})
  assert model.bert.layers[0].attention.query.kernel.shape == (64, 2, 16)
  with pytest.raises(ValueError, match="keep at least one"):
    model.bert.prune_heads({1: [0, 1, 3]})
  with pytest.raises(ValueError, match="valid are 0..3"):
    model.bert.prune_heads({1: [4]})


def test_pruning_no_heads_leaves_the_model_unchanged():
  model, reference = _model(), _model()
  ids, mask = _inputs()
  model.bert.prune_heads({})
  model.bert.prune_heads({0: [], 1: []})
  assert model.bert.pruned_heads == {}
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m))  # pylint: disable=unnecessary-lambda-assignment
  assert shapes(model) == shapes(reference)
  np.testing.assert_array_equal(np.asarray(model(ids, mask)),
                                np.asarray(reference(ids, mask)))


def test_head_pruned_export_loads_in_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = _model()
  model.bert.prune_heads({0: [0, 2], 1: [1]})
  ids, mask = _inputs()
  ours = np.asarray(model(ids, mask))
  hf.export(model, tmp_path, "sequence_classification")
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["pruned_heads"] == {"0": [0, 2], "1": [1]}
  theirs_model = transformers.BertForSequenceClassification.from_pretrained(
      tmp_path).eval()
  with torch.no_grad():
    theirs = theirs_model(input_ids=torch.tensor(np.asarray(ids)),
                          attention_mask=torch.tensor(np.asarray(mask))
                          ).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  # Our loader cuts the heads again: the same shapes and logits.
  back, report = hf.load_pretrained(str(tmp_path), "sequence_classification", 3)
  assert back.bert.pruned_heads == {0: (0, 2), 1: (1,)} and not report.missing
  np.testing.assert_allclose(np.asarray(back(ids, mask)), ours, atol=1e-6)


def test_head_importance_is_the_gate_gradient():
  """|dL/dxi_h| = |<dL/dW_o[h], W_o[h]>| per example, averaged."""
  from experiments import quickstart  # pylint: disable=import-outside-toplevel
  from research.tasks.sequence_classification import Task  # pylint: disable=import-outside-toplevel
  model = _model()
  ids, mask = _inputs(batch=3)
  batch = {"input_ids": ids, "attention_mask": mask,
           "token_type_ids": jnp.zeros_like(ids),
           "labels": jnp.array([0, 2, 1]), "weights": jnp.ones(3)}
  config = quickstart.get_config()
  config.num_labels = 3
  task = Task(config)
  got = heads.head_importance(model, task, [batch])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  want = np.zeros((2, 4))
  for row in range(3):
    one = {k: v[row:row + 1] for k, v in batch.items()}

    def loss(p, one=one):
      losses, weights = task.loss(task.forward(nnx.merge(graphdef, p, rest),
                                               one), one)
      return (losses * weights).sum()

    grads = dict(nnx.to_flat_state(jax.grad(loss)(params)))
    for layer in range(2):
      path = ("bert", "layers", layer, "attention", "output", "kernel")
      g, w = np.asarray(grads[path][...]), np.asarray(params[
          "bert"]["layers"][layer]["attention"]["output"]["kernel"][...])
      want[layer] += np.abs((g * w).sum(axis=(1, 2))) / 3
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)
  assert got.min() > 0


def test_choose_removes_the_least_important_keeping_one_per_layer():
  importance = np.array([[0.1, 0.2, 0.3, 0.4],
                         [0.01, 0.02, 0.03, 0.5]])
  assert heads.choose(importance, 0.25) == {1: [0, 1]}
  assert heads.choose(importance, 0.5) == {0: [0], 1: [0, 1, 2]}
  # Layer 1's four lowest would empty it: its best head stays.
  assert heads.choose(np.array([[9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]]),
                      0.5) == {0: [0], 1: [0, 1, 2]}
  assert heads.choose(importance, 0.0) == {}
  with pytest.raises(ValueError, match="at most 6"):
    heads.choose(importance, 0.9)
  normalised = heads.normalize(importance)
  np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0)


def test_compress_cli_prunes_heads_and_exports(tmp_path, tiny_model_dir):
  """research.compress on a trained run: heads out, scored, exported."""
  from tests.test_pruning import _config  # pylint: disable=import-outside-toplevel
  from research import compress, restore, train  # pylint: disable=import-outside-toplevel
  transformers = pytest.importorskip("transformers")
  config = _config(tiny_model_dir, "bitfit", steps=2)
  config.methods, config.method_options = (), {}
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  compressed = compress.compress(workdir, prune_heads=0.5,
                                 importance_examples=32, batch_size=16)
  assert sum(len(h) for h in compressed.model.bert.pruned_heads.values()) == 4
  result = compress.report(compressed)
  assert 0.0 <= result["metrics"]["eval/accuracy"] <= 1.0
  assert result["sparsity"]["total"] == 0.0
  out = compress.write(compressed, result, str(tmp_path / "out"))
  loaded = transformers.BertForSequenceClassification.from_pretrained(out)
  assert loaded.config.num_attention_heads == 4
  assert json.loads((tmp_path / "out" / "compression.json").read_text())[
      "pruned_heads"]
