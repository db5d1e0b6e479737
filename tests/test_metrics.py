"""Tests for research.metrics.common against scikit-learn and scipy."""

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from research.metrics import common as metrics

N = 200


@pytest.fixture
def binary():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, N)
  # Correlated with the labels so the scores are far from 0.
  predictions = np.where(rng.random(N) < 0.75, labels, 1 - labels)
  weights = rng.random(N) * 3
  return predictions, labels, weights


@pytest.fixture
def multiclass():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, N)
  predictions = np.where(rng.random(N) < 0.6, labels, rng.integers(0, 3, N))
  weights = rng.random(N) * 3
  return predictions, labels, weights


@pytest.fixture
def regression():
  rng = np.random.default_rng(2)
  # Rounded to a grid so both sides have many ties for spearman.
  labels = np.round(rng.uniform(0, 5, N) * 2) / 2
  predictions = np.round((labels + rng.normal(0, 1.5, N)) * 2) / 2
  weights = rng.integers(1, 4, N).astype(np.float64)
  return predictions, labels, weights


SKLEARN = {
    "accuracy": skm.accuracy_score,
    "f1": skm.f1_score,
    "matthews_corrcoef": skm.matthews_corrcoef,
}


@pytest.mark.parametrize("name", sorted(SKLEARN))
def test_binary_classification_matches_sklearn(name, binary):
  p, y, w = binary
  fn = getattr(metrics, name)
  expected = SKLEARN[name](y, p)
  assert 0.2 < abs(expected) < 1.0
  assert fn(p, y) == pytest.approx(expected, abs=1e-12)
  weighted = SKLEARN[name](y, p, sample_weight=w)
  assert weighted != pytest.approx(expected, abs=1e-6)
  assert fn(p, y, w) == pytest.approx(weighted, abs=1e-12)


@pytest.mark.parametrize("name", ["accuracy", "matthews_corrcoef"])
def test_multiclass_matches_sklearn(name, multiclass):
  p, y, w = multiclass
  fn = getattr(metrics, name)
  assert fn(p, y) == pytest.approx(SKLEARN[name](y, p), abs=1e-12)
  assert fn(p, y, w) == pytest.approx(
      SKLEARN[name](y, p, sample_weight=w), abs=1e-12)


def test_classification_accepts_scores(multiclass):
  p, y, _ = multiclass
  rng = np.random.default_rng(3)
  scores = rng.random((N, 3))
  scores[np.arange(N), p] += 1.0  # arg-max is p
  assert metrics.accuracy(scores, y) == metrics.accuracy(p, y)
  assert metrics.matthews_corrcoef(scores, y) == metrics.matthews_corrcoef(p, y)


def test_pearson_matches_scipy(regression):
  p, y, w = regression
  expected = scipy.stats.pearsonr(p, y)[0]
  assert 0.3 < expected < 0.95
  assert metrics.pearson(p, y) == pytest.approx(expected, abs=1e-12)
  # A trailing size-1 axis (a regression head's output) is dropped.
  assert metrics.pearson(p[:, None], y) == pytest.approx(expected, abs=1e-12)
  # Integer weights are repetition counts.
  rep = w.astype(int)
  repeated = scipy.stats.pearsonr(np.repeat(p, rep), np.repeat(y, rep))[0]
  assert metrics.pearson(p, y, w) == pytest.approx(repeated, abs=1e-12)
  # Non-integer weights: numpy's weighted covariance.
  fw = np.random.default_rng(4).random(N)
  c = np.cov(p, y, aweights=fw)
  assert metrics.pearson(p, y, fw) == pytest.approx(
      c[0, 1] / np.sqrt(c[0, 0] * c[1, 1]), abs=1e-12)


def test_spearman_matches_scipy_with_ties(regression):
  p, y, w = regression
  assert len(np.unique(p)) < N / 4 and len(np.unique(y)) < N / 4
  expected = scipy.stats.spearmanr(p, y)[0]
  assert metrics.spearman(p, y) == pytest.approx(expected, abs=1e-12)
  assert metrics.spearman(p, y) != pytest.approx(
      metrics.pearson(p, y), abs=1e-3)
  rep = w.astype(int)
  repeated = scipy.stats.spearmanr(np.repeat(p, rep), np.repeat(y, rep))[0]
  assert metrics.spearman(p, y, w) == pytest.approx(repeated, abs=1e-12)


@pytest.mark.parametrize("name", ["accuracy", "f1", "matthews_corrcoef",
                                  "pearson", "spearman"])
def test_zero_weight_rows_are_ignored(name, binary, regression):
  p, y, w = regression if name in ("pearson", "spearman") else binary
  fn = getattr(metrics, name)
  keep = np.arange(N) % 4 != 0
  w = np.where(keep, w, 0.0)
  # Garbage in the padding rows must not matter.
  p_pad = np.where(keep, p, 1 if name not in ("pearson", "spearman") else 99.0)
  y_pad = np.where(keep, y, 0 if name not in ("pearson", "spearman") else -99.0)
  expected = fn(p[keep], y[keep], w[keep])
  assert fn(p_pad, y_pad, w) == pytest.approx(expected, abs=1e-12)
  assert fn(p_pad, y_pad) != pytest.approx(expected, abs=1e-6)


def test_degenerate_inputs_return_zero():
  y = np.array([0, 1, 1, 0, 1])
  assert metrics.matthews_corrcoef(np.ones(5), y) == 0.0
  assert metrics.pearson(np.full(5, 2.0), y) == 0.0
  assert metrics.pearson(np.full(7, 0.1), np.arange(7)) == 0.0
  assert metrics.spearman(y, np.full(5, 3.0)) == 0.0
  assert metrics.f1(np.zeros(5), np.zeros(5)) == 0.0
  # Constant after dropping the padding rows.
  assert metrics.pearson([1.0, 1.0, 5.0], [0.0, 1.0, 2.0], [1, 1, 0]) == 0.0


def test_input_errors():
  with pytest.raises(ValueError, match="every weight is 0"):
    metrics.accuracy([1, 0], [1, 1], [0, 0])
  with pytest.raises(ValueError, match="shape"):
    metrics.accuracy([1, 0, 1], [1, 1])
  with pytest.raises(ValueError, match=">= 0"):
    metrics.accuracy([1, 0], [1, 1], [1, -1])


def test_token_level_shapes():
  labels = np.array([[1, 2, 0], [2, 2, 1]])
  predictions = np.array([[1, 0, 0], [2, 2, 2]])
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  assert metrics.accuracy(predictions, labels, mask) == pytest.approx(3 / 5)


def test_compute_by_name(binary):
  p, y, w = binary
  result = metrics.compute(metrics.GLUE_METRICS["mrpc"], p, y, w)
  assert list(result) == ["f1", "accuracy"]
  assert result["f1"] == pytest.approx(skm.f1_score(y, p, sample_weight=w))
  assert result["accuracy"] == pytest.approx(
      skm.accuracy_score(y, p, sample_weight=w))


def test_available_follows_naming_convention():
  assert metrics.available() == [
      "accuracy", "f1", "matthews_corrcoef", "pearson", "spearman"]
  for names in metrics.GLUE_METRICS.values():
    assert set(names) <= set(metrics.available())


def test_unknown_metric_lists_valid_names():
  with pytest.raises(ValueError, match=r"'auc'.*accuracy, f1, "
                     r"matthews_corrcoef, pearson, spearman"):
    metrics.compute(["accuracy", "auc"], [1], [1])
  with pytest.raises(ValueError, match=r"config\.eval_metric 'compute'"):
    metrics.get("compute", field="config.eval_metric")
