"""Sentence pooling (research/models/pooling.py): modes, `auto`, packed rows,
the sentence-transformers export, and the training path's config field."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from research.models import BertConfig, create_model, hf
from research.models import pooling
from tests.test_models import TINY, _pack, _padded_batch


def _jnp(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("mode", ["mean", "max", "cls", "pooler"])
def test_pooling_ignores_padding(mode):
  """Equal outputs with and without extra padding (and garbage under it)."""
  model = create_model("sequence_classification", TINY, 3, pooling=mode,
                       seed=1)
  rng = np.random.default_rng(0)
  batch = _padded_batch(99, rng)
  extra = 7
  padded = {k: np.concatenate([v, (rng.integers(5, 99, (len(v), extra))
                                   if k == "input_ids" else
                                   np.zeros((len(v), extra), v.dtype))], 1)
            for k, v in batch.items()}
  _, a = model.bert(**_jnp(batch))
  _, b = model.bert(**_jnp(padded))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert (model.bert.pooler is None) == (mode != "pooler")


def test_mean_and_max_are_over_real_tokens_only():
  model = create_model("sequence_classification", TINY, 3, pooling="mean")
  batch = _jnp(_padded_batch(99, np.random.default_rng(1)))
  x, mean = model.bert(**batch)
  x, mask = np.asarray(x), np.asarray(batch["attention_mask"]).astype(bool)
  for i in range(len(mask)):
    np.testing.assert_allclose(np.asarray(mean)[i], x[i][mask[i]].mean(0),
                               atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(pooling.pool(jnp.asarray(x), batch["attention_mask"],
                                "max"))[i], x[i][mask[i]].max(0), atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
def test_packed_rows_pool_each_example(mode):
  """Each packed example pools over its own tokens: as if alone."""
  batch = _padded_batch(99, np.random.default_rng(3))
  packed, starts = _pack(batch, 2)
  model = create_model("sequence_classification", TINY, 3, pooling=mode)
  alone = np.asarray(model(**_jnp(batch)))
  together = np.asarray(model(**_jnp(packed),
                              example_starts=jnp.asarray(starts)))
  np.testing.assert_allclose(together, alone, atol=1e-5)


def test_auto_reads_the_checkpoint(minilm_dir, tiny_bert_dir):
  # The packaged all-MiniLM-L6-v2 declares mean pooling (1_Pooling).
  assert pooling.checkpoint_pooling(minilm_dir) == "mean"
  assert pooling.resolve("auto", minilm_dir) == "mean"
  model, _ = hf.load_pretrained("all-minilm-l6-v2", "sequence_classification",
                                2, pooling="auto")
  assert model.bert.pooling == "mean" and model.bert.pooler is None
  # A plain BERT directory: the pooler.
  assert pooling.checkpoint_pooling(tiny_bert_dir) is None
  model, _ = hf.load_pretrained(str(tiny_bert_dir), "sequence_classification",
                                2, pooling="auto")
  assert model.bert.pooling == "pooler" and model.bert.pooler is not None
  # hf.load_pretrained's own default stays what transformers computes.
  model, _ = hf.load_pretrained("all-minilm-l6-v2", "sequence_classification")
  assert model.bert.pooling == "pooler"
  # From scratch, auto is the pooler.
  assert create_model("sequence_classification", TINY, pooling="auto"
                      ).bert.pooling == "pooler"


def test_checkpoint_pooling_formats_and_refusals(tmp_path):
  (tmp_path / "1_Pooling").mkdir()
  cfg = tmp_path / "1_Pooling" / "config.json"
  cfg.write_text(json.dumps({"embedding_dimension": 8, "pooling_mode": "cls"}))
  assert pooling.checkpoint_pooling(tmp_path) == "cls"  # the newer format
  cfg.write_text(json.dumps({"pooling_mode": "weightedmean"}))
  with pytest.raises(pooling.PoolingError, match="1_Pooling/config.json.*"
                     "weightedmean.*config.model.pooling"):
    pooling.resolve("auto", tmp_path)
  cfg.write_text(json.dumps({"pooling_mode_mean_tokens": True,
                             "pooling_mode_max_tokens": True}))
  with pytest.raises(pooling.PoolingError, match="one at a time"):
    pooling.checkpoint_pooling(tmp_path)
  with pytest.raises(pooling.PoolingError, match="valid: auto, pooler"):
    pooling.resolve("avg")
  # Token-level heads pool nothing: a pooling there is a mistake.
  with pytest.raises(ValueError, match="pools nothing"):
    create_model("token_classification", TINY, 3, pooling="mean")


def test_sentence_transformers_export_reproduces_embeddings(tmp_path,
                                                             minilm_dir):
  """The export loads in the sentence-transformers package with our
  embeddings and logits (within 1e-5)."""
  st = pytest.importorskip("sentence_transformers")
  from research import data  # pylint: disable=import-outside-toplevel
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=128)
  texts = ["a short one", "a considerably longer sentence, with more "
           "words in it than the first", "mid-length text here"]
  tokenizer = data.load_tokenizer(str(minilm_dir))
  enc = {k: jnp.asarray(v) for k, v in tokenizer(
      texts, padding=True, return_tensors="np").items()}
  for mode in ("mean", "max", "cls"):
    model = create_model("sequence_classification", cfg, 3, pooling=mode,
                         seed=2)
    out = hf.export_sentence_transformers(
        model, tmp_path / mode, tokenizer_dir=minilm_dir,
        label_names=("a", "b", "c"), max_seq_length=128)
    loaded = st.SentenceTransformer(str(out), device="cpu")
    outputs = loaded.encode(texts, output_value=None)
    _, ours = model.bert(enc["input_ids"], enc["attention_mask"],
                         enc["token_type_ids"])
    np.testing.assert_allclose(
        np.stack([o["sentence_embedding"].numpy() for o in outputs]),
        np.asarray(ours), atol=1e-5)
    np.testing.assert_allclose(
        np.stack([o["logits"].numpy() for o in outputs]),
        np.asarray(model(**enc)), atol=1e-5)
    # Read back, the directory declares its pooling, and loads with its
    # trained classifier (not a fresh head): the same logits.
    assert pooling.checkpoint_pooling(out) == mode
    again, report = hf.load_pretrained(str(out), "sequence_classification",
                                       3, pooling="auto", seed=7)
    assert not report.missing, report.missing
    np.testing.assert_allclose(np.asarray(again(**enc)),
                               np.asarray(model(**enc)), atol=1e-5)
  with pytest.raises(ValueError, match="pools with one of"):
    hf.export_sentence_transformers(
        create_model("sequence_classification", cfg, 3), tmp_path / "p")
