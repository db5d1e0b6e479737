"""Evaluation metrics in numpy, with sample weights.

A metric is a public function of this module whose first parameter is named
`predictions`: `fn(predictions, labels, weights=None) -> float`. `compute` and
`get` find metrics by that convention, so adding a function here is all it
takes to make a new metric name valid in `config.eval_metric`.

Weights are per example (or per token: any shape equal to `labels.shape`).
Weight 0 marks padding rows of the last, padded eval batch: they are dropped
before anything is computed. Non-integer weights act as fractional
repetition counts (integer weights give the same result as repeating rows).

Classification metrics take class ids, or scores with one more trailing axis
than `labels` (the arg-max is taken). Regression metrics take values of the
same shape as `labels`, or with one more trailing axis of size 1.
"""

import inspect
import sys

import numpy as np

GLUE_METRICS = {
    "cola": ("matthews_corrcoef",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def _prepare(predictions, labels, weights, classification):
  """Flattens the inputs and drops weight-0 rows.

  Returns:
    (predictions, labels, weights) as 1-D numpy arrays, weights float64.
  """
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  if predictions.ndim == labels.ndim + 1:
    if classification:
      predictions = predictions.argmax(axis=-1)
    elif predictions.shape[-1] == 1:
      predictions = predictions[..., 0]
  if predictions.shape != labels.shape:
    raise ValueError(
        f"predictions shape {predictions.shape} does not match labels shape "
        f"{labels.shape}.")
  if weights is None:
    weights = np.ones(labels.shape, np.float64)
  else:
    weights = np.asarray(weights, np.float64)
    if weights.shape != labels.shape:
      raise ValueError(
          f"weights shape {weights.shape} does not match labels shape "
          f"{labels.shape}.")
    if (weights < 0).any() or not np.isfinite(weights).all():
      raise ValueError("weights must be finite and >= 0.")
  keep = weights.ravel() > 0
  if not keep.any():
    raise ValueError(
        "No examples to evaluate: every weight is 0 (or the inputs are "
        "empty).")
  return (predictions.ravel()[keep], labels.ravel()[keep],
          weights.ravel()[keep])


def accuracy(predictions, labels, weights=None):
  """Weighted fraction of correct predictions.

  Args:
    predictions: class ids, or scores with a trailing class axis.
    labels: class ids.
    weights: optional per-example weights; 0 ignores an example.

  Returns:
    sum(w * [pred == label]) / sum(w).
  """
  p, y, w = _prepare(predictions, labels, weights, classification=True)
  return float(np.sum(w * (p == y)) / np.sum(w))


def f1(predictions, labels, weights=None):
  """Binary F1 score of the positive class 1.

  Args:
    predictions: class ids, or scores with a trailing class axis.
    labels: class ids (1 is positive, anything else negative).
    weights: optional per-example weights; 0 ignores an example.

  Returns:
    2 TP / (2 TP + FP + FN) with weighted counts; 0.0 when there are no
    positive predictions nor labels (as scikit-learn's default).
  """
  p, y, w = _prepare(predictions, labels, weights, classification=True)
  pred_pos, true_pos = p == 1, y == 1
  tp = np.sum(w * (pred_pos & true_pos))
  fp = np.sum(w * (pred_pos & ~true_pos))
  fn = np.sum(w * (~pred_pos & true_pos))
  denom = 2 * tp + fp + fn
  return float(2 * tp / denom) if denom > 0 else 0.0


def matthews_corrcoef(predictions, labels, weights=None):
  """Matthews correlation coefficient (multi-class, as scikit-learn).

  Args:
    predictions: class ids, or scores with a trailing class axis.
    labels: class ids.
    weights: optional per-example weights; 0 ignores an example.

  Returns:
    MCC in [-1, 1]. Degenerate inputs (all predictions or all labels one
    class) make the denominator 0; this returns 0.0 then, not NaN.
  """
  p, y, w = _prepare(predictions, labels, weights, classification=True)
  classes, idx = np.unique(np.concatenate([y, p]), return_inverse=True)
  y_idx, p_idx = idx[:len(y)], idx[len(y):]
  confusion = np.zeros((len(classes), len(classes)), np.float64)
  np.add.at(confusion, (y_idx, p_idx), w)
  t_sum = confusion.sum(axis=1)
  p_sum = confusion.sum(axis=0)
  n = confusion.sum()
  correct = np.trace(confusion)
  cov_yp = correct * n - t_sum @ p_sum
  cov_pp = n * n - p_sum @ p_sum
  cov_yy = n * n - t_sum @ t_sum
  if cov_pp * cov_yy <= 0:
    return 0.0
  return float(cov_yp / np.sqrt(cov_yy * cov_pp))


def _weighted_pearson(x, y, w):
  x = x.astype(np.float64)
  y = y.astype(np.float64)
  # Tested exactly: the weighted mean of a constant can be off by an ulp,
  # which would leave a tiny non-zero variance and a meaningless r.
  if (x == x[0]).all() or (y == y[0]).all():
    return 0.0
  wn = w / w.sum()
  dx = x - wn @ x
  dy = y - wn @ y
  var_x = wn @ (dx * dx)
  var_y = wn @ (dy * dy)
  r = (wn @ (dx * dy)) / np.sqrt(var_x * var_y)
  return float(np.clip(r, -1.0, 1.0))


def pearson(predictions, labels, weights=None):
  """Pearson correlation between predictions and labels.

  Args:
    predictions: real values (a trailing axis of size 1 is dropped).
    labels: real values.
    weights: optional per-example weights; 0 ignores an example.

  Returns:
    Weighted Pearson r. Degenerate inputs (constant predictions or labels)
    have no defined correlation; this returns 0.0 then, not NaN.
  """
  p, y, w = _prepare(predictions, labels, weights, classification=False)
  return _weighted_pearson(p, y, w)


def _weighted_ranks(x, w):
  """Ranks (1-based) counting each example w times, ties averaged.

  With integer weights this is the rank every copy gets when rows are
  repeated w times: the tie group's copies occupy ranks C + 1 .. C + W, where
  C is the weight before the group and W the group's weight.
  """
  values, inverse = np.unique(x, return_inverse=True)
  group_weight = np.bincount(inverse, weights=w, minlength=len(values))
  before = np.cumsum(group_weight) - group_weight
  return (before + (group_weight + 1) / 2)[inverse]


def spearman(predictions, labels, weights=None):
  """Spearman rank correlation, ties given their average rank.

  Args:
    predictions: real values (a trailing axis of size 1 is dropped).
    labels: real values.
    weights: optional per-example weights; 0 ignores an example.

  Returns:
    Weighted Pearson r of the weighted ranks (equal to scipy's spearmanr on
    rows repeated by integer weights). Constant predictions or labels give
    0.0, not NaN.
  """
  p, y, w = _prepare(predictions, labels, weights, classification=False)
  return _weighted_pearson(_weighted_ranks(p, w), _weighted_ranks(y, w), w)


def available():
  """Names of all metrics in this module.

  Returns:
    Sorted names of the public functions here whose first parameter is
    `predictions`.
  """
  module = sys.modules[__name__]
  names = []
  for name, fn in inspect.getmembers(module, inspect.isfunction):
    if name.startswith("_") or fn.__module__ != __name__:
      continue
    params = list(inspect.signature(fn).parameters)
    if params and params[0] == "predictions":
      names.append(name)
  return sorted(names)


def get(name, field="metric name"):
  """The metric function called `name`.

  Args:
    name: a metric name, e.g. "accuracy".
    field: what to call `name` in the error, e.g. "config.eval_metric".

  Returns:
    The function `fn(predictions, labels, weights=None) -> float`.

  Raises:
    ValueError: naming `field` and the valid metric names.
  """
  valid = available()
  if name not in valid:
    raise ValueError(
        f"Unknown {field} {name!r}; valid metrics: {', '.join(valid)}.")
  return getattr(sys.modules[__name__], name)


def compute(metric_names, predictions, labels, weights=None):
  """Computes several metrics on the same predictions.

  Args:
    metric_names: metric names, e.g. `GLUE_METRICS["mrpc"]`.
    predictions: as the metric functions take them.
    labels: as the metric functions take them.
    weights: optional per-example weights; 0 ignores an example.

  Returns:
    A dict from metric name to float, in the order of `metric_names`.

  Raises:
    ValueError: for an unknown name (listing the valid ones) before anything
      is computed.
  """
  fns = {name: get(name) for name in metric_names}
  return {name: fn(predictions, labels, weights) for name, fn in fns.items()}
