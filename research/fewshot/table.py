"""The few-shot results table: mean ± std over splits, per method and data.

`summarize` makes a protocol's summary.json from its splits' result.json
(`protocol.run_protocol`, `benchmarks/setfit_baseline.py`). `markdown` reads
every `k<K>/summary.json` under a root (`protocol.run_protocol`'s and
`benchmarks/setfit_baseline.py`'s) and writes a Markdown table: one row per
method label, one column per (data, K), each cell the test metric's mean ±
std over the splits (in %) and the mean wall time of one split; a first row
gives the test set's majority-class share.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

RESULT = "result.json"    # one split's: test and dev metrics, wall times
SUMMARY = "summary.json"  # a protocol's: mean and std over the splits


def summarize(results, majority=None, **info):
  """Mean and standard deviation (ddof=0) of each test metric over splits."""
  metrics = sorted({m for r in results for m in r["test"]})
  out = {"splits": len(results), "seeds": [r["seed"] for r in results],
         **info}
  for m in metrics:
    values = np.asarray([r["test"][m] for r in results if m in r["test"]])
    out[m] = {"mean": float(values.mean()), "std": float(values.std()),
              "values": values.tolist()}
  out["wall_s"] = float(np.mean([r["wall_s"] for r in results]))
  out["wall_s_first"] = float(results[0]["wall_s"]) if results else None
  if all("cpu_s" in r for r in results):
    out["cpu_s"] = float(np.mean([r["cpu_s"] for r in results]))
  if majority is not None:
    out["majority"] = {"label": majority[0], "share": majority[1]}
  return out


def collect(root):
  """Every summary under `root`, each with its path."""
  out = []
  pattern = os.path.join(root, "**", "k*", SUMMARY)
  for path in sorted(glob.glob(pattern, recursive=True)):
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
    summary["path"] = path
    out.append(summary)
  return out


def _column(s):
  return (s.get("dataset", "?"), int(s.get("k", 0)))


def _seconds(s):
  return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def markdown(summaries, metric="test/accuracy", rows=None):
  """The table (a string). `rows`: method labels in order (default: the
  order first met)."""
  columns = sorted({_column(s) for s in summaries},
                   key=lambda c: (c[0], c[1] == 0, -c[1]))
  labels = list(rows or [])
  for s in summaries:
    if s.get("label", "") not in labels and rows is None:
      labels.append(s.get("label", ""))
  cells = {(s.get("label", ""), _column(s)): s for s in summaries}
  head = ["method"] + [f"{d} {'full' if k == 0 else f'K={k}'}"
                       for d, k in columns]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  majority = ["majority class"]
  for c in columns:
    share = next((s["majority"]["share"] for s in summaries
                  if _column(s) == c and "majority" in s), None)
    majority.append("" if share is None else f"{100 * share:.1f}")
  lines.append("| " + " | ".join(majority) + " |")
  for label in labels:
    row = [label]
    for c in columns:
      s = cells.get((label, c))
      if s is None or metric not in s:
        row.append("")
        continue
      m = s[metric]
      n = s.get("splits", len(m["values"]))
      row.append(f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f} "
                 f"({_seconds(s['wall_s'])}{'' if n == 5 else f', n={n}'})")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"
