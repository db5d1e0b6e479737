"""Per-word explanations of a served sequence-level output (/explain).

The explained function is the same for every method: one output of the
served model (the target class's logit; the value of a regression) as a
function of the words of the input's first text (a second text of a pair
stays fixed). Words are the tokenizer's (`tokenize.words`); only the words
the model reads (within data.max_length tokens) are explained.

- `integrated_gradients`: `research.interpret` on the run's JAX model, the
  input padded to its serving bucket (baseline: [PAD] for the text's
  tokens, the special tokens kept; `Limits.ig_steps` steps, compiled per
  bucket at start-up); sub-token scores summed per word. They add up to
  f(x) - f(baseline) (`completeness_error`).
- `shap`: the `shap` package's Partition explainer, with a Text masker over
  the same words ([MASK] for a hidden word), calling the served model.
- `lime`: the `lime` package's `LimeTextExplainer` over the same words
  (positions, not a bag of words; [MASK] for a removed word), same model.

SHAP and LIME call a numpy predict function that sends their perturbed texts
through the server's dynamic batcher: padded to the serving buckets and
batch sizes, so an explanation compiles nothing.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

from research.data import tokenize
from research.tasks.common import ServeInputError

METHODS = ("integrated_gradients", "shap", "lime")


class _WordTokenizer:
  """The words of a text as shap's Text masker wants a tokenizer to give
  them: {"input_ids": words, "offset_mapping": spans}."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text, return_offsets_mapping=True, **kwargs):
    del kwargs
    spans = tokenize.words(self.tokenizer, text)
    out = {"input_ids": [w for w, _, _ in spans]}
    if return_offsets_mapping:
      out["offset_mapping"] = [(a, b) for _, a, b in spans]
    return out


class Explainer:
  """Explanations for an `engine.Engine`; see the module docstring."""

  def __init__(self, engine, methods=None):
    self.engine = engine
    self.tokenizer = engine.tokenizer
    self.mask = getattr(self.tokenizer, "mask_token", None) or "..."
    unknown = set(methods or ()) - set(METHODS)
    if unknown:
      raise ValueError(f"explain methods {sorted(unknown)}; valid: "
                       f"{', '.join(METHODS)}")
    self.methods = [m for m in METHODS if (methods is None or m in methods)
                    and (m != "integrated_gradients" or
                         engine.model is not None)]
    self._lock = threading.Lock()  # nnx.jit updates the model it is given

  # --- The model as a function of texts ---------------------------------------

  def logits(self, texts, pair=None) -> np.ndarray:
    """float64 [n, outputs]: the served model's logits of texts (with the
    same second text), through the batcher."""
    items = [{"text": str(t)} if pair is None else
             {"text": str(t), "text_pair": pair} for t in texts]
    features = self.engine.task.serve_features(items, self.engine.max_length)
    outputs = self.engine.run([f.rows[0] for f in features])
    return np.stack([np.asarray(o, np.float64) for o in outputs])

  def warmup(self):
    """Compiles integrated gradients for every bucket, and SHAP's and
    LIME's own code (shap compiles with numba on first use)."""
    item = {"text": "warm up"}
    if len(self.engine.task.config.data.text_fields) == 2:
      item["text_pair"] = "warm up"
    others = [m for m in self.methods if m != "integrated_gradients"]
    if others:
      self.explain(item, others, samples=10)
    if "integrated_gradients" not in self.methods:
      return
    from research import interpret  # pylint: disable=import-outside-toplevel
    pad = self.engine.task.pad_id
    for length in self.engine.buckets:
      mask = np.zeros(length, np.int32)
      mask[0] = 1
      inputs = interpret.Inputs.from_ids(np.full(length, pad, np.int32), mask)
      with self._lock:
        interpret.integrated_gradients(
            self.engine.model, inputs, target=0,
            steps=self.engine.limits.ig_steps,
            baseline=interpret.word_embeddings(self.engine.model,
                                               inputs.input_ids))

  # --- One input ---------------------------------------------------------------

  def _target(self, target, logits) -> int:
    names = self.engine.label_names
    count = len(logits)
    if count == 1:  # regression
      if target not in (None, 0, "0"):
        raise ServeInputError(f"target={target!r}: a regression model has "
                              "one output; leave target out")
      return 0
    if target is None:
      return int(np.argmax(logits))
    if isinstance(target, str) and target in names:
      return names.index(target)
    if isinstance(target, int) and 0 <= target < count:
      return target
    raise ServeInputError(f"target={target!r}; valid: a label name "
                          f"({', '.join(names) or 'none'}) or an id "
                          f"0-{count - 1}")

  def _read_words(self, text, pair):
    """The words the model reads (within max_length tokens), and whether
    some were not read."""
    words = tokenize.words(self.tokenizer, text)
    enc = self.tokenizer(text, pair, truncation=True,
                         max_length=self.engine.max_length,
                         return_offsets_mapping=True)
    ends = [b for (a, b), s in zip(enc["offset_mapping"], enc.sequence_ids())
            if s == 0 and b > a]
    last = max(ends, default=0)
    read = [w for w in words if w[1] < last]
    return read, len(read) < len(words)

  def explain(self, item, methods=None, target=None, samples=200,
              seed=0) -> dict:
    """Per-word attributions of one input (a dict with text, text_pair).

    Args:
      item: the input, as /predict takes it.
      methods: a subset of `self.methods` (default: all of them).
      target: the class (name or id) explained; default the predicted one.
      samples: SHAP's evaluation budget and LIME's samples.
      seed: LIME's random state.

    Raises:
      ServeInputError: an unknown method or target, or no words.
    """
    methods = list(methods or self.methods)
    unknown = [m for m in methods if m not in self.methods]
    if unknown:
      why = ("" if "integrated_gradients" not in unknown else
             "; integrated_gradients needs the run's JAX model (serve a "
             "--workdir)")
      raise ServeInputError(f"methods {unknown}: not available; valid: "
                            f"{', '.join(self.methods)}{why}")
    text, pair = item["text"], item.get("text_pair")
    words, cut = self._read_words(text, pair)
    if not words:
      raise ServeInputError("inputs[].text has no words to explain")
    explained = text[:words[-1][2]]
    logits = self.logits([explained], pair)[0]
    target = self._target(target, logits)
    names = self.engine.label_names
    out = {"target": names[target] if len(logits) > 1 and names else target,
           "target_id": target, "output": float(logits[target]),
           "words": [{"word": w, "start": a, "end": b} for w, a, b in words],
           "attributions": {}, "truncated": cut}
    if cut:
      out["notes"] = [f"explained the words within the model's "
                      f"{self.engine.max_length} tokens (data.max_length)"]
    for method in methods:
      scores, extra = getattr(self, "_" + method)(
          explained, pair, words, target, samples, seed)
      out["attributions"][method] = [float(s) for s in scores]
      out.update(extra)
    return out

  def _integrated_gradients(self, text, pair, words, target, samples, seed):
    del samples, seed
    from research import interpret  # pylint: disable=import-outside-toplevel
    enc = self.tokenizer(text, pair, truncation=True,
                         max_length=self.engine.max_length,
                         return_offsets_mapping=True)
    bucket = self.engine.batcher.bucket(len(enc["input_ids"]))
    inputs = interpret.encode(self.tokenizer, text, pair,
                              max_length=self.engine.max_length, pad_to=bucket)
    steps = self.engine.limits.ig_steps
    # The baseline is [PAD] at the explained text's tokens only: [CLS],
    # [SEP] and a pair's second text stay, so all of f(x) - f(baseline) is
    # on the words (Captum's BERT recipe).
    explained = np.zeros(bucket, bool)
    explained[:len(enc["input_ids"])] = [s == 0 for s in enc.sequence_ids()]
    baseline_ids = np.where(explained, self.engine.task.pad_id,
                            inputs.input_ids)
    with self._lock:
      baseline = interpret.word_embeddings(self.engine.model, baseline_ids)
      attr = interpret.integrated_gradients(
          self.engine.model, inputs, target=target, steps=steps,
          baseline=baseline)
    starts = [a for _, a, _ in words]
    scores = np.zeros(len(words))
    for score, (a, b), s in zip(attr.scores, enc["offset_mapping"],
                                enc.sequence_ids()):
      if s == 0 and b > a:
        scores[bisect.bisect_right(starts, a) - 1] += score
    check = interpret.completeness(attr)
    return scores, {"integrated_gradients": {
        "baseline": "pad (special tokens kept)", "steps": steps,
        "baseline_output": attr.baseline_output,
        "completeness_error": check.error}}

  def _shap(self, text, pair, words, target, samples, seed):
    del seed
    if len(words) == 1:
      # shap's partition tree needs two words; one word's Shapley value is
      # f(x) - f(masked) (what shap's efficiency gives).
      _, a, b = words[0]
      base = self.logits([text[:a] + self.mask + text[b:]], pair)[0, target]
      return (np.asarray([self.logits([text], pair)[0, target] - base]),
              {"shap": {"base_value": float(base)}})
    import shap  # pylint: disable=import-outside-toplevel
    masker = shap.maskers.Text(_WordTokenizer(self.tokenizer),
                               mask_token=self.mask, collapse_mask_token=False)
    explainer = shap.Explainer(lambda texts: self.logits(texts, pair), masker,
                               algorithm="partition")
    values = explainer([text], max_evals=samples,
                       batch_size=self.engine.batcher.max_batch, silent=True)
    base = np.asarray(values.base_values[0]).reshape(-1)[target]
    # Efficiency: the values add up to output - base_value.
    return np.asarray(values.values[0])[:, target], {
        "shap": {"base_value": float(base)}}

  def _lime(self, text, pair, words, target, samples, seed):
    from lime import lime_text  # pylint: disable=import-outside-toplevel
    explainer = lime_text.LimeTextExplainer(
        split_expression=lambda s: [w for w, _, _ in
                                    tokenize.words(self.tokenizer, s)],
        bow=False, mask_string=self.mask, random_state=seed)
    explanation = explainer.explain_instance(
        text, lambda texts: self.logits(texts, pair), labels=(target,),
        num_features=len(words), num_samples=samples)
    indexed = explanation.domain_mapper.indexed_string
    by_start = {a: i for i, (_, a, _) in enumerate(words)}
    scores = np.zeros(len(words))
    for feature, weight in explanation.as_map()[target]:
      start = int(indexed.string_start[indexed.positions[feature]])
      if start in by_start:
        scores[by_start[start]] = weight
    return scores, {"lime": {"score": float(explanation.score)}}
