"""research.interpret: forward with sown attention, attention maps, attributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import interpret
from research.models import BertConfig, create_model
from tests.conftest import TESTDATA

# Large initial weights (0.2, not BERT's 0.02) make the tiny model clearly
# non-linear, so integrated gradients and gradient x input differ.
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, initializer_range=0.2)
CONFIGS = {"bert": BertConfig(**TINY),
           "roberta": BertConfig(**TINY, model_type="roberta", pad_token_id=1)}
# Distinct token ids (3..12), so a word-embedding row belongs to one position.
IDS = np.array([2, 5, 17, 33, 8, 41, 12, 3])


def _model(kind="bert", num_labels=3, seed=1):
  return create_model("sequence_classification", CONFIGS[kind], num_labels,
                      seed=seed)


def _padded(kind, extra=3):
  """IDS followed by `extra` padding positions (mask 0, pad id)."""
  pad = CONFIGS[kind].pad_token_id
  ids = np.concatenate([IDS, np.full(extra, pad)])
  mask = np.concatenate([np.ones(len(IDS)), np.zeros(extra)]).astype(np.int32)
  return interpret.Inputs.from_ids(ids, mask)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("num_labels", [3, 1])
def test_forward_reproduces_model_logits(kind, num_labels):
  model = _model(kind, num_labels)
  rng = np.random.default_rng(0)
  ids = rng.integers(4, 100, size=(3, 12))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  types = np.zeros_like(ids)
  types[0, 6:] = 1
  ids, mask, types = map(jnp.asarray, (ids, mask, types))
  ours = interpret.forward(model, ids, mask, types)
  theirs = model(ids, mask, types)
  assert ours.logits.shape == (3, num_labels)
  np.testing.assert_allclose(ours.logits, theirs, rtol=0, atol=1e-5)
  hidden, pooled = model.bert(ids, mask, types)
  np.testing.assert_allclose(ours.hidden, hidden, rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours.pooled, pooled, rtol=0, atol=1e-5)
  # The logits are not trivially equal: they differ between examples.
  assert float(jnp.abs(theirs[0] - theirs[1]).max()) > 1e-2
  # Given embeddings instead of ids: the same result.
  embeds = interpret.word_embeddings(model, ids)
  again = interpret.forward(model, None, mask, types, inputs_embeds=embeds)
  np.testing.assert_array_equal(again.logits, ours.logits)


def test_forward_reproduces_checkpoint_model(tiny_model_dir):
  from research import data  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  model, _ = hf.load_pretrained(str(tiny_model_dir), "sequence_classification", 2)
  tokenizer = data.load_tokenizer(str(tiny_model_dir))
  inputs = interpret.encode(tokenizer, "a quiet, lovely film", "too long though",
                            pad_to=16)
  assert inputs.tokens[:3] == ("[CLS]", "a", "quiet")
  assert inputs.tokens[-1] == "[PAD]" and inputs.attention_mask[-1] == 0
  assert inputs.token_type_ids.max() == 1 and inputs.mask_token_id == 103
  ours = interpret.forward(model, *inputs.batch).logits
  np.testing.assert_allclose(ours, model(*inputs.batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_attention_maps_are_probabilities_over_real_keys(kind):
  model = _model(kind)
  inputs = _padded(kind)
  maps = interpret.attention_maps(model, inputs)
  t = len(inputs.input_ids)
  assert maps.shape == (2, 4, t, t) and maps.dtype == np.float32
  real = inputs.attention_mask.astype(bool)
  np.testing.assert_allclose(maps[..., real].sum(-1), 1.0, atol=1e-5)
  assert np.all(maps[..., ~real] == 0.0)  # exactly, not just small
  # Not uniform: heads attend differently.
  assert np.abs(maps[0, 0] - maps[0, 1]).max() > 1e-2


def test_integrated_gradients_completeness_for_each_baseline():
  model = _model()
  inputs = interpret.Inputs.from_ids(IDS, mask_token_id=7)
  for baseline in ("pad", "zero", "mask", 9):
    attr = interpret.integrated_gradients(model, inputs, target=1,
                                          baseline=baseline, steps=32)
    check = interpret.completeness(attr)
    assert abs(check.expected) > 0.1, (baseline, check)  # a real change
    assert check.relative_error < 1e-2, (baseline, check)
    assert check.ok
  # The trapezoid error falls with the steps (as 1 / steps**2).
  coarse = interpret.completeness(
      interpret.integrated_gradients(model, inputs, target=1, steps=2))
  fine = interpret.completeness(
      interpret.integrated_gradients(model, inputs, target=1, steps=32))
  assert fine.error < coarse.error / 20, (coarse, fine)


def test_integrated_gradients_batching_does_not_change_the_result():
  model = _model()
  inputs = interpret.Inputs.from_ids(IDS)
  whole = interpret.integrated_gradients(model, inputs, target=2, steps=12)
  chunked = interpret.integrated_gradients(model, inputs, target=2, steps=12,
                                           batch_size=5)  # 13 points, 3 chunks
  np.testing.assert_allclose(chunked.scores, whole.scores, rtol=1e-5, atol=1e-6)
  assert whole.output == chunked.output


def test_gradient_x_input_is_not_complete_where_integrated_gradients_is():
  model = _model()
  inputs = interpret.Inputs.from_ids(IDS)
  gxi = interpret.completeness(interpret.gradient_x_input(model, inputs, 1))
  ig = interpret.completeness(interpret.integrated_gradients(
      model, inputs, 1, baseline="zero", steps=32))
  assert gxi.expected == pytest.approx(ig.expected)  # same f(x) - f(0)
  assert not gxi.ok and gxi.relative_error > 0.03  # measured 0.054
  assert ig.relative_error < 1e-2


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_padding_gets_exactly_zero_attribution(kind):
  model = _model(kind)
  padded = _padded(kind)
  pad = ~padded.attention_mask.astype(bool)
  for attr in (interpret.integrated_gradients(model, padded, 0, steps=8),
               interpret.gradient_x_input(model, padded, 0)):
    assert np.all(attr.scores[pad] == 0.0), attr.scores
    assert np.all(attr.scores[~pad] != 0.0)
  # Padding changes nothing for the real tokens.
  plain = interpret.integrated_gradients(
      model, interpret.Inputs.from_ids(IDS), 0, steps=8)
  np.testing.assert_allclose(
      interpret.integrated_gradients(model, padded, 0, steps=8).scores[~pad],
      plain.scores, rtol=1e-4, atol=1e-5)


def test_gradient_x_input_matches_the_models_own_gradient():
  """Checked against jax.grad of the model's __call__, not our forward."""
  model = _model()
  inputs = interpret.Inputs.from_ids(IDS, tokens=[f"w{i}" for i in IDS])
  attr = interpret.gradient_x_input(model, inputs, target=2)
  assert attr.scores.shape == (len(IDS),) and attr.scores.dtype == np.float32
  assert attr.tokens == tuple(f"w{i}" for i in IDS)
  assert attr.method == "gradient_x_input" and attr.target == 2

  graphdef, params = nnx.split(model, nnx.Param)
  def logit(p):
    return nnx.merge(graphdef, p)(*inputs.batch)[0, 2]
  table_grad = jax.jit(jax.grad(logit))(params).bert.embeddings.word_embeddings.embedding
  table = params.bert.embeddings.word_embeddings.embedding
  # Each id occurs once, so its table row's gradient is its position's.
  expected = (table[...][IDS] * table_grad[...][IDS]).sum(-1)
  np.testing.assert_allclose(attr.scores, expected, rtol=1e-4, atol=1e-6)
  assert attr.output == pytest.approx(float(logit(params)), abs=1e-5)


def test_target_defaults_to_predicted_class_and_regression_to_its_output():
  model = _model()
  inputs = interpret.Inputs.from_ids(IDS)
  predicted = int(np.argmax(model(*inputs.batch)[0]))
  assert interpret.gradient_x_input(model, inputs).target == predicted
  with pytest.raises(ValueError, match="target=3; the model has 3 classes"):
    interpret.gradient_x_input(model, inputs, 3)

  regressor = _model(num_labels=1)
  attr = interpret.integrated_gradients(regressor, inputs, steps=32)
  assert attr.target == 0
  assert attr.output == pytest.approx(float(regressor(*inputs.batch)[0, 0]),
                                      abs=1e-5)
  assert interpret.completeness(attr).relative_error < 1e-2


def test_bad_arguments_are_named():
  model = _model()
  inputs = interpret.Inputs.from_ids(IDS)
  with pytest.raises(ValueError, match="needs inputs.mask_token_id"):
    interpret.integrated_gradients(model, inputs, 0, baseline="mask")
  with pytest.raises(ValueError, match="baseline='unk'; valid: pad, zero, mask"):
    interpret.integrated_gradients(model, inputs, 0, baseline="unk")
  with pytest.raises(ValueError, match=r"\[t, hidden\] = \(8, 32\)"):
    interpret.integrated_gradients(model, inputs, 0, baseline=np.zeros((8, 5)))
  token_model = create_model("token_classification", CONFIGS["bert"], 3)
  with pytest.raises(TypeError, match="got TokenClassification"):
    interpret.gradient_x_input(token_model, inputs, 0)
  # Attention maps work for any head.
  assert interpret.attention_maps(token_model, inputs).shape == (2, 4, 8, 8)


def test_attribution_html_colours_each_real_token():
  attr = interpret.Attribution(
      tokens=("[CLS]", "good", "<b>", "[SEP]", "[PAD]"),
      scores=np.array([0.0, 2.0, -1.0, 0.5, 0.0], np.float32),
      attention_mask=np.array([1, 1, 1, 1, 0]), method="integrated_gradients",
      target=1, output=1.5, baseline_output=0.0, baseline="pad", steps=8)
  page = interpret.attribution_html(attr)
  assert page.count("<span") == 4 and "[PAD]" not in page
  assert "rgba(220,40,40,1.000)" in page          # "good": full red
  assert "rgba(40,90,220,0.500)" in page          # "<b>": half blue
  assert "&lt;b&gt;" in page and 'title="+2.0000"' in page
  assert "[PAD]" in interpret.attribution_html(attr, skip_padding=False)


# --- Goldens recorded with the pre-hook implementation --------------------------
# tests/testdata/golden_interpret.npz holds attention maps and attributions
# computed by the instrumented forward copy (interpret/forward.py before it was
# rebuilt on the model's hooks); tests/testdata/make_interpret_golden.py wrote
# it with `golden_values` below. The model's own path must give the same.

GOLDEN_SENTENCES = ("a warm, funny and friendly film",
                    "the plot drags but the cast is great")


def golden_models(minilm_head=None):
  """name -> (model, list of Inputs) for the golden: tiny BERT and RoBERTa
  with seeded weights, and the real MiniLM with a seeded 2-class head
  (`minilm_head`: {"kernel", "bias"} arrays to set, from the golden)."""
  from research import data  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  models = {}
  for kind in ("bert", "roberta"):
    pad = CONFIGS[kind].pad_token_id
    plain = interpret.Inputs.from_ids(IDS, mask_token_id=7)
    pair = interpret.Inputs.from_ids(
        np.concatenate([IDS, [44, 45, pad, pad]]),
        np.array([1] * 10 + [0, 0]), np.array([0] * 8 + [1, 1, 0, 0]),
        mask_token_id=7)
    models[f"tiny_{kind}"] = (_model(kind), [plain, pair])
  model, _ = hf.load_pretrained("all-minilm-l6-v2", "sequence_classification",
                                2, seed=0)
  if minilm_head is not None:
    model.classifier.kernel[...] = jnp.asarray(minilm_head["kernel"])
    model.classifier.bias[...] = jnp.asarray(minilm_head["bias"])
  tokenizer = data.load_tokenizer(str(hf.resolve("all-minilm-l6-v2")))
  models["minilm"] = (model, [
      interpret.encode(tokenizer, GOLDEN_SENTENCES[0]),
      interpret.encode(tokenizer, GOLDEN_SENTENCES[1], pad_to=14)])
  return models


def fingerprint(model) -> np.ndarray:
  """sum |w| over every weight (float64): says the golden's weights are these."""
  return np.array(sum(np.abs(np.asarray(v[...], np.float64)).sum() for _, v in
                      nnx.to_flat_state(nnx.state(model, nnx.Param))))


def golden_values(models) -> dict[str, np.ndarray]:
  """Attention maps, attributions and outputs, flat `name/i/what` keys."""
  out = {}
  for name, (model, examples) in models.items():
    for i, inputs in enumerate(examples):
      key = f"{name}/{i}/"
      out[key + "input_ids"] = inputs.input_ids
      out[key + "attention_maps"] = interpret.attention_maps(model, inputs)
      out[key + "logits"] = np.asarray(
          interpret.forward(model, *inputs.batch).logits)
      for baseline in ("pad", "zero", "mask"):
        attr = interpret.integrated_gradients(model, inputs, target=1,
                                              baseline=baseline, steps=8)
        out[key + f"ig_{baseline}"] = attr.scores
        out[key + f"ig_{baseline}_outputs"] = np.array(
            [attr.output, attr.baseline_output], np.float32)
      attr = interpret.gradient_x_input(model, inputs, target=0)
      out[key + "gxi"] = attr.scores
      out[key + "gxi_outputs"] = np.array([attr.output, attr.baseline_output],
                                          np.float32)
  return out


@pytest.mark.slow
def test_same_values_as_the_instrumented_forward_golden():
  """Attention maps, attributions and logits as the pre-hook implementation
  gave them (golden_interpret.npz), now from the model's own hooks."""
  g = np.load(TESTDATA / "golden_interpret.npz")
  models = golden_models({"kernel": g["minilm/head/kernel"],
                          "bias": g["minilm/head/bias"]})
  for name, (model, _) in models.items():
    np.testing.assert_allclose(
        fingerprint(model), g[f"{name}/fingerprint"], rtol=1e-9,
        err_msg=f"{name}: not the golden's weights (initialisation changed?)")
  values = golden_values(models)
  assert values.keys() == {k for k in g if "/head/" not in k
                           and not k.endswith("fingerprint")}
  for key, value in values.items():
    # 1e-5 of each array's largest entry (bitwise equal on CPU when written).
    np.testing.assert_allclose(value, g[key], rtol=0,
                               atol=1e-5 * float(np.abs(g[key]).max()),
                               err_msg=key)
  # The goldens are not trivial: real attributions, several heads.
  assert np.abs(g["minilm/0/ig_pad"]).max() > 5e-3  # a random 0.02 head
  assert np.abs(g["minilm/1/attention_maps"][5, 0]
                - g["minilm/1/attention_maps"][5, 1]).max() > 0.1
