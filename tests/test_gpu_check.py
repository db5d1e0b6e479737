"""benchmarks/gpu_check.py, the prepared GPU check, runs end to end on CPU.

Only its tiny settings and no timing is asserted: the numbers it prints on a
GPU are in BENCHMARKS.md. What must hold everywhere: every part writes its
results, the optimiser variants compute the same losses as the library's
step, and the trace reader counts device kernels and busy time correctly.
"""

import gzip
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # pylint: disable=wrong-import-position


def test_trace_summary_counts_device_kernels(tmp_path):
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      # Two overlapping kernels on two streams and one later: busy 3 + 1 us.
      {"ph": "X", "pid": 1, "tid": 1, "name": "gemm", "ts": 0, "dur": 2},
      {"ph": "X", "pid": 1, "tid": 2, "name": "fusion", "ts": 1, "dur": 2},
      {"ph": "X", "pid": 1, "tid": 1, "name": "gemm", "ts": 10, "dur": 1},
      {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 50},
  ]
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "host.perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  s = gpu_check.trace_summary(str(tmp_path), steps=1)
  assert s["kernels_per_step"] == 3
  assert s["gpu_busy_ms_per_step"] == pytest.approx(4e-3)
  assert s["kernel_sum_ms_per_step"] == pytest.approx(5e-3)
  assert s["top_kernels"][0] == {"name": "gemm", "count_per_step": 2,
                                 "ms_per_step": pytest.approx(3e-3)}
  assert s["top_host_events"][0]["name"] == "PjitFunction(step)"


def test_tiny_run_writes_every_part(tmp_path):
  out, work = tmp_path / "out", tmp_path / "work"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
       "--out", str(out), "--work", str(work), "--tiny",
       "--parts", "launch,ceiling,variants", "--variants", "ours,flat_adamw"],
      capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "gpu_check.json").read_text())
  assert results["env"]["device_kind"] == "cpu"
  assert results["launch"] == {"skipped": "no CUDA device for torch"}
  assert results["ceiling"]["jax_tflops"] > 0
  ours, flat = results["variants"]["ours"], results["variants"]["flat_adamw"]
  for v in (ours, flat):
    assert v["blocked_ms"] > 0 and v["compile_s"] > 0 and v["hlo_fusions"] > 0
  # The multi-tensor AdamW is the library's fused AdamW over one buffer:
  # after the same steps on the same batch the loss is the same.
  assert flat["loss"] == pytest.approx(ours["loss"], rel=1e-4)
  assert "variants/ours: blocked" in proc.stdout.splitlines()[-2]
