"""Masked-LM accuracy and perplexity against torch's cross-entropy."""

import math

import jax
import numpy as np
import pytest
import torch

from research.metrics import mlm


def _case(seed, batch=6, length=20, vocab=50):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 3
  labels = rng.integers(0, vocab, size=(batch, length))
  labels[rng.random((batch, length)) > 0.2] = -100
  # Make some predictions right so accuracy is not ~1/vocab.
  right = (labels != -100) & (rng.random((batch, length)) < 0.5)
  b, t = np.nonzero(right)
  logits[b, t, labels[b, t]] += 10
  return logits, labels


def _torch(logits, labels):
  lg, lb = torch.from_numpy(logits), torch.from_numpy(labels)
  loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]),
                                           lb.reshape(-1), ignore_index=-100)
  keep = lb != -100
  acc = (lg.argmax(-1)[keep] == lb[keep]).double().mean()
  return loss.item(), acc.item(), int(keep.sum())


def test_matches_torch():
  logits, labels = _case(0)
  got = mlm.evaluate(logits, labels)
  loss, acc, count = _torch(logits, labels)
  assert got["masked_tokens"] == count > 0
  np.testing.assert_allclose(got["mlm_loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], math.exp(loss), rtol=1e-5)
  np.testing.assert_allclose(got["mlm_accuracy"], acc)
  assert 0.3 < got["mlm_accuracy"] < 0.8


def test_summed_over_batches_is_the_whole_set_not_a_mean_of_batches():
  parts = [_case(seed, batch=b) for seed, b in ((1, 3), (2, 7), (3, 1))]
  step = jax.jit(mlm.sums)
  totals = None
  for logits, labels in parts:
    totals = mlm.add(totals, step(logits, labels))
  got = mlm.metrics(totals)
  whole_logits = np.concatenate([p[0] for p in parts])
  whole_labels = np.concatenate([p[1] for p in parts])
  loss, acc, count = _torch(whole_logits, whole_labels)
  assert got["masked_tokens"] == count
  np.testing.assert_allclose(got["mlm_loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], math.exp(loss), rtol=1e-5)
  np.testing.assert_allclose(got["mlm_accuracy"], acc)
  per_batch = np.mean([mlm.evaluate(*p)["perplexity"] for p in parts])
  assert abs(per_batch - got["perplexity"]) > 1e-3  # Would be wrong.


def test_bf16_logits_and_uniform_chance():
  vocab = 30522
  logits = np.zeros((2, 4, vocab), np.float32)
  labels = np.array([[5, -100, 7, 9], [-100, -100, 1, 2]])
  got = mlm.evaluate(jax.numpy.asarray(logits, jax.numpy.bfloat16), labels)
  # Uniform scores: loss log(V), perplexity V (chance).
  np.testing.assert_allclose(got["mlm_loss"], math.log(vocab), rtol=1e-6)
  np.testing.assert_allclose(got["perplexity"], vocab, rtol=1e-5)


def test_no_masked_token_is_an_error():
  with pytest.raises(ValueError, match="No masked tokens to evaluate"):
    mlm.evaluate(np.zeros((1, 3, 5), np.float32), np.full((1, 3), -100))
