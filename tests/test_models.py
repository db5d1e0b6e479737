"""The NNX BERT against transformers' PyTorch BertModel, and the heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models import BertConfig, create_model, hf, head_class
from research.models.bert import attention
from tests.conftest import TESTDATA

TINY = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64)


def _encode(model, inputs):
  hidden, pooled = model.bert(jnp.asarray(inputs["input_ids"]),
                              jnp.asarray(inputs["attention_mask"]),
                              jnp.asarray(inputs["token_type_ids"]))
  return np.asarray(hidden), np.asarray(pooled)


@pytest.mark.parametrize("golden,model_name", [
    ("golden_tiny_bert.npz", str(TESTDATA / "tiny_bert")),
    ("golden_minilm.npz", "all-minilm-l6-v2"),
])
def test_parity_with_committed_golden(golden, model_name):
  """Runs without torch: outputs recorded from transformers' BertModel."""
  g = np.load(TESTDATA / golden)
  assert g["attention_mask"].min() == 0, "the golden batch must contain padding"
  model, _ = hf.load_pretrained(model_name, "sequence_classification")
  hidden, pooled = _encode(model, g)
  assert np.abs(hidden - g["last_hidden_state"]).max() < 1e-4
  assert np.abs(pooled - g["pooler_output"]).max() < 1e-4


def _padded_batch(vocab_size, rng):
  lengths = np.array([13, 9, 4, 1])
  ids = rng.integers(5, vocab_size, size=(4, 13))
  mask = (np.arange(13)[None] < lengths[:, None]).astype(np.int64)
  types = ((np.arange(13)[None] >= lengths[:, None] // 2) * mask)
  return {"input_ids": ids * mask, "attention_mask": mask,
          "token_type_ids": types.astype(np.int64)}


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_parity_with_torch_random_config(tmp_path, model_type):
  torch = pytest.importorskip("torch", reason="parity against live PyTorch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(1)
  kw = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3,
            num_attention_heads=6, intermediate_size=64,
            max_position_embeddings=40)
  if model_type == "roberta":
    ref = transformers.RobertaModel(transformers.RobertaConfig(
        **kw, pad_token_id=1, type_vocab_size=1)).eval()
  else:
    ref = transformers.BertModel(transformers.BertConfig(**kw)).eval()
  ref.save_pretrained(tmp_path)
  inputs = _padded_batch(120, np.random.default_rng(0))
  if model_type == "roberta":  # one segment; pad id 1
    inputs["token_type_ids"] = np.zeros_like(inputs["input_ids"])
    inputs["input_ids"] = np.where(inputs["attention_mask"] == 1,
                                   inputs["input_ids"], 1)
  with torch.no_grad():
    out = ref(**{k: torch.tensor(v) for k, v in inputs.items()})
  model, report = hf.load_pretrained(str(tmp_path), "sequence_classification")
  assert report.unexpected == []
  hidden, pooled = _encode(model, inputs)
  real = inputs["attention_mask"].astype(bool)
  assert np.abs(hidden[real] - out.last_hidden_state.numpy()[real]).max() < 1e-4
  assert np.abs(pooled - out.pooler_output.numpy()).max() < 1e-4


def test_parity_with_torch_minilm(minilm_dir):
  torch = pytest.importorskip("torch", reason="parity against live PyTorch")
  transformers = pytest.importorskip("transformers")
  ref = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  inputs = dict(tok(["a sentence that is long enough to need padding below",
                     "tiny"], ["second segment", "x"], padding=True,
                    return_tensors="np"))
  with torch.no_grad():
    out = ref(**{k: torch.tensor(v) for k, v in inputs.items()})
  model, _ = hf.load_pretrained("all-minilm-l6-v2", "sequence_classification")
  hidden, pooled = _encode(model, inputs)
  assert np.abs(hidden - out.last_hidden_state.numpy()).max() < 1e-4
  assert np.abs(pooled - out.pooler_output.numpy()).max() < 1e-4


def test_padding_mask_is_exact():
  """Changing what sits in padded positions cannot change real outputs."""
  model = create_model("token_classification", TINY, 3)
  rng = np.random.default_rng(0)
  batch = _padded_batch(99, rng)
  noisy = dict(batch, input_ids=np.where(batch["attention_mask"] == 1,
                                         batch["input_ids"],
                                         rng.integers(5, 99, batch["input_ids"].shape)))
  a = np.asarray(model(**batch))
  b = np.asarray(model(**noisy))
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(a[real], b[real])


def _pack(batch, per_row):
  """Packs a padded batch's examples into rows of `per_row`, by hand."""
  lengths = batch["attention_mask"].sum(1)
  rows = len(lengths) // per_row
  width = max(lengths.reshape(rows, per_row).sum(1)) + 2  # some padding
  out = {k: np.zeros((rows, width), np.int64) for k in
         ("input_ids", "attention_mask", "token_type_ids", "segment_ids")}
  starts = np.zeros((rows, per_row), np.int64)
  for i, n in enumerate(lengths):
    r, k = divmod(i, per_row)
    at = starts[r, k] = out["attention_mask"][r].sum()
    for key in ("input_ids", "token_type_ids"):
      out[key][r, at:at + n] = batch[key][i, :n]
    out["attention_mask"][r, at:at + n] = 1
    out["segment_ids"][r, at:at + n] = k + 1
  return out, starts


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_rows_give_each_example_its_own_outputs(model_type):
  """Examples packed back to back = the same examples padded, one per row."""
  cfg = TINY.replace(model_type=model_type,
                     pad_token_id=1 if model_type == "roberta" else 0)
  rng = np.random.default_rng(3)
  batch = _padded_batch(99, rng)
  # Four examples of lengths 13, 9, 4, 1 in two rows of two.
  packed, starts = _pack(batch, 2)
  model = create_model("sequence_classification", cfg, 3)
  alone = np.asarray(model(**batch))
  together = np.asarray(model(**packed, example_starts=jnp.asarray(starts)))
  np.testing.assert_allclose(together, alone, atol=1e-5)
  # Token outputs too (attention is block-diagonal, positions restart).
  tokens = create_model("token_classification", cfg, 3)
  alone = np.asarray(tokens(**batch))
  packed_out = np.asarray(tokens(**packed))
  for i, n in enumerate(batch["attention_mask"].sum(1)):
    r, k = divmod(i, 2)
    at = starts[r, k]
    np.testing.assert_allclose(packed_out[r, at:at + n], alone[i, :n],
                               atol=1e-5)


def test_packed_position_ids_restart_per_example():
  model = create_model("token_classification", TINY, 3)
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 0]])
  pos = model.bert.position_ids((seg > 0).astype(jnp.int32), seg)
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0, 0, 1],
                                      [0, 0, 1, 2, 3, 4, 5, 0]])


def test_explicit_attention_path_matches_fused():
  """The dropout path (explicit softmax) computes the same function."""
  rng = jax.random.key(0)
  q, k, v = (jax.random.normal(r, (2, 6, 4, 8))
             for r in jax.random.split(rng, 3))
  mask = (jnp.arange(6)[None, :] < jnp.array([6, 3])[:, None])[:, None, None, :]
  fused = attention(q, k, v, mask)
  explicit = attention(q, k, v, mask, dropout_rate=1e-12,
                       rngs=nnx.Rngs(dropout=0))
  np.testing.assert_allclose(fused, explicit, atol=1e-5)


@pytest.mark.parametrize("task,shape", [
    ("sequence_classification", (4, 3)),
    ("token_classification", (4, 13, 3)),
    ("masked_lm", (4, 13, 99)),
])
def test_heads_shapes_and_dropout(task, shape):
  model = create_model(task, TINY, 3)
  batch = _padded_batch(99, np.random.default_rng(0))
  logits = model(**batch)
  assert logits.shape == shape and logits.dtype == jnp.float32
  # Dropout is on only when rngs are passed, and depends on the key.
  np.testing.assert_array_equal(logits, model(**batch))
  train = [np.asarray(model(**batch, rngs=nnx.Rngs(dropout=s))) for s in (0, 1)]
  assert not np.allclose(train[0], train[1])


def test_question_answering_head():
  model = create_model("question_answering", TINY)
  start, end = model(**_padded_batch(99, np.random.default_rng(0)))
  assert start.shape == end.shape == (4, 13)


def test_masked_lm_decoder_is_tied():
  model = create_model("masked_lm", TINY)
  names = [".".join(map(str, p)) for p, _ in
           nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert not any("decoder" in n and "bias" not in n for n in names)
  batch = _padded_batch(99, np.random.default_rng(0))
  before = np.asarray(model(**batch))
  emb = model.bert.embeddings.word_embeddings.embedding
  emb[...] = emb[...].at[7].add(jnp.linspace(-1.0, 1.0, TINY.hidden_size))
  after = np.asarray(model(**batch))
  # Token 7 is a row of the tied decoder: its logit moves everywhere.
  assert np.abs(after[..., 7] - before[..., 7]).min() > 1e-3


def test_every_weight_has_logical_axis_names():
  for task in ("sequence_classification", "question_answering", "masked_lm"):
    model = create_model(task, TINY, 2)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == var[...].ndim, path


def test_bfloat16_compute_with_float32_params():
  m32 = create_model("sequence_classification", TINY, 3, seed=3)
  m16 = create_model("sequence_classification", TINY, 3, dtype="bfloat16",
                     seed=3)
  leaves = jax.tree.leaves(nnx.state(m16, nnx.Param))
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
  batch = _padded_batch(99, np.random.default_rng(0))
  a, b = np.asarray(m32(**batch)), np.asarray(m16(**batch))
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-2


def test_remat_gives_same_outputs_and_gradients():
  batch = {k: jnp.asarray(v) for k, v in
           _padded_batch(99, np.random.default_rng(0)).items()}

  def grads(remat):
    model = create_model("sequence_classification", TINY, 3, remat=remat)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      return nnx.merge(graphdef, p)(**batch, rngs=nnx.Rngs(dropout=0)).sum()
    return jax.grad(loss)(params)

  for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_unknown_task_and_dtype_are_named():
  with pytest.raises(ValueError, match="config.task='ner'.*valid:.*token_classification"):
    head_class("ner")
  with pytest.raises(ValueError, match="config.model.dtype='fp8'.*bfloat16"):
    create_model("sequence_classification", TINY, dtype="fp8")
