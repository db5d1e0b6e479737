"""The NNX BERT against transformers' PyTorch BertModel, and the heads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.models import BertConfig, create_model, hf, head_class
from research.models.bert import attention, make_dense, stack_attention
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


# --- Hooks: inputs_embeds, prefix_kv, sow_attention, dense_factory ------------


def _jnp_batch(seed=0):
  return {k: jnp.asarray(v) for k, v in
          _padded_batch(99, np.random.default_rng(seed)).items()}


@pytest.mark.parametrize("task", ["sequence_classification",
                                  "token_classification", "masked_lm"])
def test_inputs_embeds_equal_the_lookup(task):
  model = create_model(task, TINY, 3)
  batch = _jnp_batch()
  ids = batch.pop("input_ids")
  embeds = model.bert.embeddings.word_embeddings(ids)
  for rngs in (None, 7):  # evaluation, and training with the same dropout key
    kw = {} if rngs is None else {"rngs": nnx.Rngs(dropout=rngs)}
    a = model(ids, **batch, **kw)
    kw = {} if rngs is None else {"rngs": nnx.Rngs(dropout=rngs)}
    b = model(None, **batch, inputs_embeds=embeds, **kw)
    np.testing.assert_array_equal(a, b)
  # The embeddings are really used: another vector for token 0 moves logits.
  moved = model(None, **batch, inputs_embeds=embeds.at[:, 0].add(1.0))
  assert np.abs(np.asarray(moved) - np.asarray(a)).max() > 1e-3
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model(ids, **batch, inputs_embeds=embeds)
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model(None, **batch)


def _prefix(cfg, batch_size, length, seed=0):
  """Random per-layer (key, value), each [batch, length, heads, head_dim]."""
  keys = jax.random.split(jax.random.key(seed), 2 * cfg.num_hidden_layers)
  shape = (batch_size, length, cfg.num_attention_heads, cfg.head_dim)
  return [(jax.random.normal(keys[2 * i], shape),
           jax.random.normal(keys[2 * i + 1], shape))
          for i in range(cfg.num_hidden_layers)]


def _reference_with_prefix(bert, batch, prefix):
  """The encoder with prefix attention written out here (float64 softmax),
  reusing the model's own embeddings, projections, MLP and norms."""
  mask = batch["attention_mask"]
  x = bert.embeddings(batch["input_ids"], batch["token_type_ids"],
                      bert.position_ids(mask))
  real = np.concatenate([np.ones((mask.shape[0], prefix[0][0].shape[1])),
                         np.asarray(mask)], axis=1).astype(bool)
  for layer, (pk, pv) in zip(bert.layers, prefix):
    att = layer.attention
    q = np.asarray(att.query(x), np.float64)
    k = np.concatenate([pk, att.key(x)], axis=1).astype(np.float64)
    v = np.concatenate([pv, att.value(x)], axis=1).astype(np.float64)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(real[:, None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = jnp.asarray(np.einsum("bhqk,bkhd->bqhd", probs, v), jnp.float32)
    x = layer.attention_layer_norm(x + att.output(y))
    x = layer.output_layer_norm(
        x + layer.output(layer.activation(layer.intermediate(x))))
  return np.asarray(x)


def test_prefix_kv_enters_only_through_attention():
  model = create_model("token_classification", TINY, 3)
  batch = _jnp_batch()
  plain, _ = model.bert(**batch)
  # No prefix and an empty prefix: the same function, bit for bit.
  empty, _ = model.bert(**batch, prefix_kv=_prefix(TINY, 4, 0))
  np.testing.assert_array_equal(empty, plain)
  prefix = _prefix(TINY, 4, 3)
  ours, _ = model.bert(**batch, prefix_kv=prefix)
  real = np.asarray(batch["attention_mask"]).astype(bool)
  expected = _reference_with_prefix(model.bert, batch, prefix)
  np.testing.assert_allclose(np.asarray(ours)[real], expected[real], atol=1e-5)
  # Every real token's output moves.
  assert np.abs(np.asarray(ours) - np.asarray(plain)).max(-1)[real].min() > 1e-2
  # A stacked array [layers, 2, batch, p, heads, head_dim] and a prefix
  # shared by the batch ([1, p, heads, head_dim]) work too.
  stacked = jnp.stack([jnp.stack(kv) for kv in prefix])
  np.testing.assert_array_equal(model.bert(**batch, prefix_kv=stacked)[0], ours)
  shared = [(k[:1], v[:1]) for k, v in prefix]
  np.testing.assert_array_equal(
      model.bert(**batch, prefix_kv=shared)[0],
      model.bert(**batch, prefix_kv=[(jnp.repeat(k, 4, 0), jnp.repeat(v, 4, 0))
                                     for k, v in shared])[0])
  # The heads pass it through; gradients reach the prefix.
  grad = jax.grad(lambda p: model(**batch, prefix_kv=p).sum())(prefix)
  assert all(float(jnp.abs(g).max()) > 0 for kv in grad for g in kv)
  with pytest.raises(ValueError, match="prefix_kv has 1 layers; the model has 2"):
    model.bert(**batch, prefix_kv=prefix[:1])


def _sown_attention(model, batch, **kw):
  logits, sown = nnx.capture(
      lambda m: m(**batch, sow_attention=True, **kw), nnx.Intermediate)(model)
  return logits, stack_attention(sown)


@pytest.mark.parametrize("remat", [False, True])
def test_sown_attention_probabilities(remat):
  model = create_model("sequence_classification", TINY, 3, remat=remat)
  batch = _jnp_batch()
  logits, probs = _sown_attention(model, batch)
  t = batch["input_ids"].shape[1]
  assert probs.shape == (2, 4, TINY.num_attention_heads, t, t)
  assert probs.dtype == jnp.float32
  real = np.asarray(batch["attention_mask"]).astype(bool)  # [b, t]
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  padding_keys = ~real[None, :, None, None, :]  # [1, b, 1, 1, t]
  assert np.all(np.where(padding_keys, np.asarray(probs), 0.0) == 0.0)
  assert np.where(padding_keys, 1.0, np.asarray(probs)).min() > 0.0
  # The explicit path computes what the fused default computes.
  np.testing.assert_allclose(logits, model(**batch), atol=1e-5)
  # Without sow_attention nothing is recorded (the default fused path).
  _, sown = nnx.capture(lambda m: m(**batch), nnx.Intermediate)(model)
  assert not jax.tree.leaves(sown)
  # Under jit, and with a prefix (prefix keys come first).
  prefix = _prefix(TINY, 4, 2)
  _, jitted = nnx.jit(lambda m: _sown_attention(m, batch, prefix_kv=prefix))(model)
  assert jitted.shape == (2, 4, TINY.num_attention_heads, t, t + 2)
  assert float(jitted[..., :2].min()) > 0.0
  np.testing.assert_allclose(jitted.sum(-1), 1.0, atol=1e-5)


def test_sown_attention_in_training_is_before_dropout():
  model = create_model("sequence_classification", TINY, 3)
  batch = _jnp_batch()
  logits, probs = _sown_attention(model, batch, rngs=nnx.Rngs(dropout=3))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # Dropout is the same as without recording (same key, same draws).
  np.testing.assert_allclose(logits, model(**batch, rngs=nnx.Rngs(dropout=3)),
                             atol=1e-6)


class Gate(nnx.Param):
  """A trainable per-output scale: the kind of variable a method adds."""


class GatedDense(nnx.LinearGeneral):
  """A dense layer with a gate (ones: numerically the plain layer)."""

  def __init__(self, *args, kernel_axes, **kw):
    super().__init__(*args, **kw)
    self.gate = Gate(jnp.ones(self.bias.shape), out_sharding=kernel_axes[
        -self.bias[...].ndim:], eager_sharding=False)

  def __call__(self, x):
    return super().__call__(x) * self.gate[...]


def test_dense_factory_replaces_every_linear(tiny_bert_dir):
  names = []

  def gated(in_f, out_f, *, kernel_axes, name, axis=-1, stddev, dtype,
            param_dtype, rngs):
    names.append(name)
    default = make_dense(in_f, out_f, kernel_axes=kernel_axes, name=name,
                         axis=axis, stddev=stddev, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    layer = GatedDense(in_f, out_f, axis=axis, dtype=dtype,
                       param_dtype=param_dtype, kernel_axes=kernel_axes,
                       rngs=nnx.Rngs(0))
    layer.kernel, layer.bias = default.kernel, default.bias  # same init
    return layer

  plain, _ = hf.load_pretrained(str(tiny_bert_dir), "sequence_classification", 3)
  model, report = hf.load_pretrained(str(tiny_bert_dir),
                                     "sequence_classification", 3,
                                     dense_factory=gated)
  per_layer = ["attention.query", "attention.key", "attention.value",
               "attention.output", "intermediate", "output"]
  assert names == per_layer * 2 + ["pooler", "classifier"]
  assert isinstance(model.bert.layers[1].attention.value, GatedDense)
  # The HF weights load into the custom layers; only the new ones are new.
  assert report.unexpected == []
  assert sorted(report.missing) == sorted(
      ["classifier.bias", "classifier.kernel", "classifier.gate",
       "bert.pooler.gate"] + [f"bert.layers.{i}.{n}.gate" for i in range(2)
                              for n in per_layer])
  batch = _jnp_batch()
  np.testing.assert_array_equal(model(**batch), plain(**batch))
  # The gates train like any weight and carry logical axis names.
  gates = nnx.state(model, Gate)
  for path, var in nnx.to_flat_state(gates):
    assert len(var.get_metadata()["out_sharding"]) == var[...].ndim, path
  graphdef, params = nnx.split(model, nnx.Param)
  grads = jax.grad(lambda p: nnx.merge(graphdef, p)(**batch).sum())(params)
  assert float(jnp.abs(grads["bert"]["layers"][0]["intermediate"]["gate"][...]).max()) > 0


def test_cudnn_attention_gets_lengths_for_a_padding_mask(monkeypatch):
  """cuDNN refuses a [b, 1, 1, k] mask: a padding mask goes in as lengths.

  No GPU here: the call's arguments are checked, then computed by XLA's
  implementation, which must give the masked result.
  """
  from research.models import bert as bert_lib
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 4)), jnp.float32)
             for _ in range(3))
  attention_mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  mask = attention_mask.astype(bool)[:, None, None, :]
  seen = {}
  real = jax.nn.dot_product_attention

  def fake(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
    seen.update(kw, mask=mask, implementation=implementation)
    return real(q, k, v, bias, mask, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  out = bert_lib.attention(q, k, v, mask, implementation="cudnn")
  assert seen["implementation"] == "cudnn" and seen["mask"] is None
  np.testing.assert_array_equal(seen["key_value_seq_lengths"], [3, 5])
  expected = real(q, k, v, mask=mask, implementation="xla")
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_scanned_and_unrolled_layers_compute_the_same():
  """`scan_layers` changes how the layers run, not what they compute: equal
  logits, and equal losses over 20 training steps with dropout on (each
  layer's dropout key is the same in both)."""
  cfg = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=3,
                   num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=64)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, 500, (8, 16)))
  mask = jnp.asarray((np.arange(16)[None] < rng.integers(4, 17, (8, 1)))
                     .astype(np.int32))
  labels = jnp.asarray(rng.integers(0, 3, 8))
  losses = {}
  for scan in (False, True):
    model = create_model("sequence_classification", cfg, 3, seed=1,
                         scan_layers=scan)
    assert model.bert.scan_layers is scan
    graphdef, params = nnx.split(model)
    logits = nnx.merge(graphdef, params)(ids, mask)
    losses[scan, "logits"] = np.asarray(logits)

    def loss_fn(p, key):
      out = nnx.merge(graphdef, p)(ids, mask, rngs=nnx.Rngs(dropout=key))
      return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    @jax.jit
    def step(p, key):
      loss, grads = jax.value_and_grad(loss_fn)(p, key)
      return jax.tree.map(lambda w, g: w - 0.1 * g, p, grads), loss

    trace = []
    for i in range(20):
      params, loss = step(params, jax.random.key(i))
      trace.append(float(loss))
    losses[scan, "train"] = np.asarray(trace)
  np.testing.assert_allclose(losses[True, "logits"], losses[False, "logits"],
                             atol=1e-6)
  np.testing.assert_allclose(losses[True, "train"], losses[False, "train"],
                             atol=1e-5)
  assert losses[False, "train"][-1] < losses[False, "train"][0]


def _np_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_pre_ln_layer(p, x, mask, cfg, use_bias):
  """A pre-LN transformer layer in numpy: x + attn(LN(x)), + MLP(LN(.))."""
  from scipy.special import erf  # pylint: disable=import-outside-toplevel
  b = lambda w: w["bias"] if use_bias else 0.0  # pylint: disable=unnecessary-lambda-assignment
  att = p["attention"]
  norm = lambda h, n: _np_layer_norm(h, p[n]["scale"], p[n]["bias"],  # pylint: disable=unnecessary-lambda-assignment
                                     cfg.layer_norm_eps)
  h = norm(x, "attention_layer_norm")
  q, k, v = (np.einsum("bte,ehd->bthd", h, att[n]["kernel"]) + b(att[n])
             for n in ("query", "key", "value"))
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
  scores = np.where(mask[:, None, None, :], scores, -1e30)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum("bhqk,bkhd->bqhd", probs, v)
  x = x + np.einsum("bqhd,hde->bqe", ctx, att["output"]["kernel"]) + b(
      att["output"])
  h = norm(x, "output_layer_norm") @ p["intermediate"]["kernel"] + b(
      p["intermediate"])
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # BERT's erf GELU
  return x + h @ p["output"]["kernel"] + b(p["output"])


@pytest.mark.parametrize("use_bias", [True, False])
def test_pre_layer_norm_layer_matches_numpy(use_bias):
  """A pre-LN layer (random weights, LayerNorms and biases moved off their
  init) against the same layer written in numpy; the model adds a final
  LayerNorm after the last layer."""
  from research.models.bert import Layer  # pylint: disable=import-outside-toplevel
  cfg = TINY.replace(pre_layer_norm=True, use_bias=use_bias,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  layer = Layer(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  state = nnx.state(layer, nnx.Param)
  flat = nnx.to_flat_state(state)
  for _, var in flat:  # every weight random and O(1/sqrt(fan_in))
    var[...] = jnp.asarray(rng.normal(size=var.shape) * 0.3, jnp.float32)
  nnx.update(layer, state)
  names = {".".join(map(str, p)) for p, _ in flat}
  assert ("attention.query.bias" in names) == use_bias
  assert ("intermediate.bias" in names) == use_bias
  params = {}
  for path, var in flat:
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.asarray(var[...], np.float64)
  x = rng.normal(size=(3, 7, cfg.hidden_size))
  mask = np.arange(7)[None] < np.array([7, 4, 1])[:, None]
  got = layer(jnp.asarray(x, jnp.float32),
              jnp.asarray(mask)[:, None, None, :])
  want = _np_pre_ln_layer(params, x, mask, cfg, use_bias)
  np.testing.assert_allclose(np.asarray(got)[mask], want[mask], atol=2e-4,
                             rtol=2e-4)
  # Post-LN with the same weights computes something else.
  post = Layer(cfg.replace(pre_layer_norm=False), dtype=jnp.float32,
               param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  nnx.update(post, state)
  assert np.abs(np.asarray(post(jnp.asarray(x, jnp.float32), jnp.asarray(
      mask)[:, None, None, :])) - want)[mask].max() > 0.1
  model = create_model("masked_lm", cfg, seed=0)
  assert model.bert.final_layer_norm is not None
  assert create_model("masked_lm", TINY, seed=0).bert.final_layer_norm is None


def test_masked_positions_decode_only_those_tokens():
  model = create_model("masked_lm", TINY, seed=0)
  batch = _jnp_batch()
  dense = model(**batch)
  positions = jnp.asarray([[1, 3], [0, 2], [4, 4], [2, 0]], jnp.int32)
  sparse = model(**batch, masked_positions=positions)
  assert sparse.shape == (4, 2, TINY.vocab_size)
  np.testing.assert_allclose(
      sparse, np.take_along_axis(np.asarray(dense), np.asarray(positions)[
          ..., None], axis=1), atol=1e-5)
