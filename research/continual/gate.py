"""The promotion gate, held-out scores of a version, shadow evaluation.

    scores = evaluate(version_dir, {"old": "mr_dev.tsv", "new": "cr_dev.tsv"})
    decision = decide(candidate_scores, current_scores, metric="accuracy",
                      margin=0.005, max_forgetting=0.01)
    decision.promote, decision.reasons
    shadow(store, current_dir, candidate_dir, limit=500)  # agreement

A candidate replaces the current model only if it is better where the
feedback came from (the new held-out data, by at least `margin`) and has
not lost more than `max_forgetting` where the model worked before (the old
held-out data). Shadow evaluation replays requests the served model logged
through both models, as `research.serve` would answer them, and reports how
often they agree: a large disagreement on real traffic is worth a look
before promoting, whatever the held-out scores say.
"""

from __future__ import annotations

import dataclasses

from research import restore
from research.data import splits


def evaluate(model_dir: str, files: dict, batch_size: int = 64) -> dict:
  """`{"<name>/<metric>": value}` of a version (or run) on labelled files.

  Args:
    model_dir: a registry version or a research.train workdir (best).
    files: {name: a file in the run's config.data format}.
    batch_size: evaluation batch size.
  """
  restored = restore.restore_run(model_dir)
  out = {}
  for name, path in files.items():
    split = splits.load_file(restored.config, restored.tokenizer,
                             restored.task, path, name,
                             list(restored.label_names), where=name)
    evaluator = restored.make_evaluator(
        split, batch_size, tuple(restored.config.data.buckets))
    for metric, value in evaluator.run(restored.params,
                                       restored.frozen).items():
      out[f"{name}/{metric}"] = float(value)
  return out


@dataclasses.dataclass
class Decision:
  """What the gate decided and why.

  Attributes:
    promote: the candidate may replace the current model.
    gain: candidate minus current on the new held-out data.
    forgetting: current minus candidate on the old held-out data.
    reasons: one line per condition, met or not.
  """
  promote: bool
  gain: float
  forgetting: float
  reasons: list


def decide(candidate: dict, current: dict, *, metric: str, margin: float,
           max_forgetting: float, new: str = "new", old: str = "old",
           mode: str = "max") -> Decision:
  """The gate on two `evaluate` results (the same files).

  `mode` "min" is a metric where lower is better (a loss).
  """
  sign = 1.0 if mode == "max" else -1.0
  key_new, key_old = f"{new}/{metric}", f"{old}/{metric}"
  for name, scores in (("candidate", candidate), ("current", current)):
    missing = [k for k in (key_new, key_old) if k not in scores]
    if missing:
      raise ValueError(f"the gate needs {missing} of the {name} model; it "
                       f"has {sorted(scores)}")
  gain = sign * (candidate[key_new] - current[key_new])
  forgot = sign * (current[key_old] - candidate[key_old])
  better = gain >= margin and gain > 0
  kept = forgot <= max_forgetting
  reasons = [
      f"{key_new}: {current[key_new]:.4f} -> {candidate[key_new]:.4f} "
      f"(gain {gain:+.4f}; needs >= {margin} and > 0): "
      f"{'ok' if better else 'not enough'}",
      f"{key_old}: {current[key_old]:.4f} -> {candidate[key_old]:.4f} "
      f"(forgot {forgot:+.4f}; at most {max_forgetting}): "
      f"{'ok' if kept else 'too much'}"]
  return Decision(better and kept, gain, forgot, reasons)


def _engine(path, max_length):
  from research.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel
  # One padded shape: a replay is a batch job, not latency-bound traffic.
  eng = engine_lib.load(path, batching_options=engine_lib.Batching(
      max_batch=32, batch_sizes=(32,), buckets=(max_length,)),
      explain_methods=())
  eng.start(block=True)
  return eng


def shadow(store, current_dir: str, candidate_dir: str,
           limit: int = 500) -> dict:
  """Replays the last `limit` logged requests through both models.

  Returns:
    {"requests": n, "agreement": share of inputs where both give the same
    answer, "changed": up to 5 examples that differ}.
  """
  items = store.recent_requests(limit)
  if not items:
    return {"requests": 0, "agreement": None, "changed": []}
  config = restore.read_config(current_dir)
  answers = []
  for path in (current_dir, candidate_dir):
    eng = _engine(path, config.data.max_length)
    try:
      answers.append([a for i in range(0, len(items), 32)
                      for a in eng.predict(items[i:i + 32])])
    finally:
      eng.close()

  def answer(result):  # a class, a tag sequence, a span: the task's answer
    return {k: v for k, v in result.items()
            if k not in ("truncated", "notes", "scores", "probabilities")}

  same = 0
  changed = []
  for item, a, b in zip(items, *answers):
    if answer(a) == answer(b):
      same += 1
    elif len(changed) < 5:
      changed.append({"input": item, "current": answer(a),
                      "candidate": answer(b)})
  return {"requests": len(items), "agreement": same / len(items),
          "changed": changed}
