"""Training-speed benchmark of a config (and of any baseline beside it).

    python -m research.bench --config experiments/quickstart.py
    python -m research.bench --config experiments/glue_sst2.py --steps 300 \
        --warmup 20 --peak_tflops 989 --config.model.dtype=bfloat16
    python -m research.bench --abstract_flops 128   # bert-base FLOP check

Runs `--steps` updates (default: the config's whole run) of the update that
training runs (`research.train.make_train_step`), from step 0 of a freshly
loaded checkpoint, on the config's batches (`data.Batcher` through
`parallelism.prefetch`), then evaluates on the config's eval split, and prints
one table (`format_table`):

- rates: training examples/s, real (non-pad) tokens/s and padded tokens/s over
  the timed steps: those from `--warmup` on that compiled nothing (the steps
  that compiled are counted in the compile rows instead);
- step time: median and p10/p90 of the timed steps, each measured from asking
  for the batch to `block_until_ready` of the new state;
- FLOPs: the analytic count per token (`flops_per_token`) with the model's own
  kernel sizes, the compiled count (`cost_analysis()` of the step for the most
  common batch shape), and MFU against `--peak_tflops` or the peak detected
  from the device kind (`PEAK_TFLOPS`; CPUs have none unless given);
- padding efficiency, compilations of the train and eval steps (in total and
  after the first epoch), compile time, peak device memory where reported;
- the host input pipeline alone (batches/s, with no model step) against the
  step's rate; time to first step (build + compile + step 1); eval time.

`--repeats N`: medians of N runs; `--profile DIR`: a trace of 5 steps.

`benchmark(..., baseline=fn)` adds another framework's column on the same
work (HF PyTorch, a lean loop or the Trainer: `benchmarks/compare_torch.py`):

    python benchmarks/compare_torch.py --config experiments/quickstart.py --torch_trainer
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np

from research import cli, data, evaluators, parallelism, train
from research.configs import ConfigError, validate
from research.models import BertConfig, hf
from research.training import host_memory, partition, xla_flags
from research.training.flops import (abstract_step_flops, batch_model_flops,
                                      compiled_flops, detect_peak_tflops,
                                      flops_per_token, matmul_params,
                                      padded_batch_flops)
from research.training.steps import precompile

log = logging.getLogger("research.bench")

# jax.monitoring events of one compilation (jax/_src/dispatch.py).
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class BenchError(ValueError):
  """A benchmark setting that cannot work (named flag and valid values)."""


# --- Measurement helpers ---------------------------------------------------------


class CompileLog:
  """Counts XLA compilations and their seconds while open (jax.monitoring).

  Seconds are tracing + lowering + backend compilation.
  """

  def __init__(self):
    self.count = 0
    self.seconds = 0.0

  def _listener(self, event, duration, **_):
    if event == _COMPILE_EVENT:
      self.count += 1
    if event in (_TRACE_EVENT, _LOWER_EVENT, _COMPILE_EVENT):
      self.seconds += duration

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def peak_memory_bytes(devices) -> int | None:
  """Largest `peak_bytes_in_use` over the devices; None where not reported."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except (NotImplementedError, RuntimeError):
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def time_input_pipeline(batcher, sharding, num_batches: int,
                        start_step: int = 0) -> dict:
  """The host pipeline with no model step: batch_at + shard_batch, to device.

  Returns:
    {"batches_per_s", "examples_per_s", "seconds"} (global examples).
  """
  t0 = time.perf_counter()
  examples = 0
  for step in range(start_step, start_step + num_batches):
    host = batcher.batch_at(step)
    jax.block_until_ready(parallelism.shard_batch(host, sharding))
    examples += int(host["weights"].sum()) * jax.process_count()
  seconds = time.perf_counter() - t0
  return {"batches_per_s": num_batches / seconds,
          "examples_per_s": examples / seconds, "seconds": seconds}


def timing_summary(step_times, examples, real_tokens, padded_tokens,
                   timed) -> dict:
  """Rates and step-time percentiles over the steps where `timed` is True."""
  timed = np.asarray(timed, bool)
  if not timed.any():
    raise BenchError("no timed steps: raise --steps above --warmup (and the "
                     "steps that compile)")
  t = np.asarray(step_times)[timed]
  seconds = float(t.sum())
  pick = lambda x: float(np.asarray(x)[timed].sum())  # pylint: disable=unnecessary-lambda-assignment
  return {
      "timed_steps": int(timed.sum()),
      "examples_per_s": pick(examples) / seconds,
      "real_tokens_per_s": pick(real_tokens) / seconds,
      "padded_tokens_per_s": pick(padded_tokens) / seconds,
      "step_ms_median": 1e3 * float(np.median(t)),
      "step_ms_p10": 1e3 * float(np.percentile(t, 10)),
      "step_ms_p90": 1e3 * float(np.percentile(t, 90)),
  }


# --- The JAX run ---------------------------------------------------------------


def setup(config, devices=None) -> train.Run:
  """The run as `research.train` builds it (`train.build`, no workdir).

  Data, model (freshly loaded), trainable/frozen split, optimiser, update
  step and evaluators: the same code as training. A `Run` trains once (its
  state is donated); `benchmark` builds one per repeat.
  """
  return train.build(config, None, devices)


def run_jax(s: train.Run, steps: int, warmup: int, pipeline_batches: int = 0,
            evaluate: bool = True, cost_analysis: bool = True,
            profile_dir: str | None = None, profile_steps: int = 5,
            started: float | None = None) -> dict:
  """Trains `steps` updates from the run's fresh state and measures them.

  Args:
    s: from `setup`; its state is donated (used up).
    steps: updates to run (each `grad_accum_steps` micro-batches).
    warmup: the first updates, left out of the rates.
    pipeline_batches: batches for `time_input_pipeline` (0: as many as the
      run's micro-batches, at least 20).
    evaluate: run the evaluators after training.
    cost_analysis: count the FLOPs of the step for the most common batch
      shape (`compiled_flops`: a cache hit, the run compiled it). CPU only:
      on GPUs the matrix products run as library calls (cuBLAS) that
      `cost_analysis` does not count (0.1-0.3 of the FLOPs on an H200).
    profile_dir: write a `jax.profiler` trace of `profile_steps` steps
      from `warmup` on here (TensorBoard's profile plugin or xprof reads
      it; `perfetto_trace.json.gz` too).
    started: `time.perf_counter()` when the run began (before `setup`):
      the time to the end of the first step is reported from it.

  Returns:
    A dict of raw measurements (see `summarize`).
  """
  config = s.config
  accum = config.optimizer.grad_accum_steps
  cfg = s.model_cfg
  per_token, per_seq = matmul_params(
      partition.merge(s.graphdef, s.state["params"], s.frozen),
      getattr(s.task, "head_fraction", lambda _: 1.0)(config.data.max_length))
  state, frozen, train_step = s.state, s.frozen, s.train_step
  batch_sharding = s.batch_sharding
  procs = jax.process_count()
  steps_per_epoch = s.steps_per_epoch

  rec = {k: [] for k in ("step_times", "examples", "real_tokens",
                         "padded_tokens", "model_flops", "padded_flops",
                         "compiled", "new_shape", "width")}
  start = time.perf_counter()
  with CompileLog() as compiles:
    # As `research.train` does: every width of the run compiled up front.
    precompiled = (precompile(train_step, state, frozen,
                              s.train_batches, batch_sharding, 0,
                              steps * accum)
                   if config.precompile else {"shapes": 0})
    # Training compiles the evaluation in a background thread meanwhile;
    # here it finishes first, so that no compile event of its lands in a
    # timed step (they are counted process-wide).
    if config.precompile and evaluate and s.evaluators:
      evaluators.precompile_async(s.evaluators, state["params"], frozen).join()
    precompile_events, precompile_seconds = compiles.count, compiles.seconds
  # Shapes compile on parallel threads: their summed seconds (CPU time)
  # can exceed the wall time they took, which is what a run waits.
  precompile_wall = time.perf_counter() - start
  first_step_end = None
  profile_end = min(steps, warmup + profile_steps) if profile_dir else -1
  # The training loop's own update generator (`train.train_steps`); each
  # step timed from asking for its batches to `block_until_ready`.
  updates = train.train_steps(s, state, 0, steps)
  with CompileLog() as compiles:
    for step in range(steps):
      if step == warmup and profile_dir:
        jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
      t0 = time.perf_counter()
      compiles_before = compiles.count
      _, state, metrics, hosts = next(updates)
      jax.block_until_ready((state, metrics))
      rec["step_times"].append(time.perf_counter() - t0)
      first_step_end = first_step_end or time.perf_counter()
      if step + 1 == profile_end:
        jax.profiler.stop_trace()
      # A width's first step (its first run; a compile unless precompiled)
      # is untimed.
      width = hosts[-1]["attention_mask"].shape[1]
      rec["new_shape"].append(width not in rec["width"])
      rec["compiled"].append(compiles.count > compiles_before)
      ex = real = padded = mflops = pflops = 0
      for host in hosts:  # host-side counts of the numpy copies
        lens = data.example_lengths(host)  # packed rows: per example
        ex += len(lens) * procs
        real += int(lens.sum()) * procs
        padded += host["attention_mask"].size * procs
        mflops += procs * batch_model_flops(lens, per_token, per_seq,
                                            cfg.num_hidden_layers, cfg.hidden_size)
        pflops += procs * padded_batch_flops(host, per_token, per_seq,
                                             cfg.num_hidden_layers,
                                             cfg.hidden_size)
      for key, value in (("examples", ex), ("real_tokens", real),
                         ("padded_tokens", padded), ("model_flops", mflops),
                         ("padded_flops", pflops),
                         ("width", width)):
        rec[key].append(value)
    train_seconds = time.perf_counter() - start
    train_compiles, compile_seconds = compiles.count, compiles.seconds
  final_loss = float(metrics["loss"])

  compiled = np.asarray(rec["compiled"])
  timed = ((np.arange(steps) >= warmup) & ~np.asarray(rec["new_shape"])
           & ~compiled)
  result = {
      "framework": "jax",
      "device": f"{s.mesh.devices.size} x {s.mesh.devices.flat[0].device_kind}"
                + (", malloc retain" if host_memory.in_effect() else ""),
      "num_devices": int(s.mesh.devices.size),
      "steps": steps, "warmup": warmup, "steps_per_epoch": steps_per_epoch,
      "buckets": list(s.train_batches.buckets),
      "batch_size": config.batch_size, "dtype": config.model.dtype,
      "timed": timed.tolist(), **rec,
      "train_seconds": train_seconds,
      "final_loss": final_loss,
      "train_compilations": train_step._cache_size(),  # pylint: disable=protected-access
      "train_compilations_after_epoch_1": int(compiled[steps_per_epoch:].sum()),
      "precompiled": precompiled["shapes"],
      "precompile_detail": precompiled,
      "compile_events": precompile_events + train_compiles,
      "compile_seconds": (min(precompile_seconds, precompile_wall)
                          + compile_seconds),
      "compile_thread_seconds": precompile_seconds + compile_seconds,
      "time_to_first_step": (first_step_end - started) if started else None,
      "profile_dir": profile_dir,
      "num_layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
      "matmul_params_per_token": per_token,
      "matmul_params_per_sequence": per_seq,
      "peak_memory_bytes": peak_memory_bytes(
          [d for d in s.mesh.devices.flat if d.process_index == jax.process_index()]),
      "device_kind": s.mesh.devices.flat[0].device_kind,
  }

  # The host pipeline alone, on the same batches the run used.
  n = pipeline_batches or max(steps * accum, 20)
  result["pipeline"] = time_input_pipeline(s.train_batches, batch_sharding, n)

  if cost_analysis and s.mesh.devices.flat[0].platform != "cpu":
    result["cost_analysis"] = {"skipped": "CPU only (library calls such as "
                                          "cuBLAS are not counted)"}
  elif cost_analysis:
    widths = [w for w, t in zip(rec["width"], timed) if t] or rec["width"]
    width = max(set(widths), key=widths.count)
    step_of_width = rec["width"].index(width)
    host = s.train_batches.batch_at(step_of_width * accum)
    flops = compiled_flops(train_step, state, frozen,
                           parallelism.shard_batch(host, batch_sharding), 0)
    result["cost_analysis"] = {
        "width": width, "rows": host["attention_mask"].shape[0] * procs,
        "compiled": flops,
        "analytic": procs * padded_batch_flops(host, per_token, per_seq,
                                               cfg.num_hidden_layers,
                                               cfg.hidden_size)}

  if evaluate and s.evaluators:
    t0 = time.perf_counter()
    # The training metrics of each split (as `train_and_evaluate` logs them,
    # without the loss, which the PyTorch column has not).
    result["eval"] = {}
    for name, evaluator in s.evaluators.items():
      metrics = evaluator.run(state["params"], frozen)
      if metrics:
        result["eval"][name] = {k: v for k, v in metrics.items()
                                if k != "loss"}
    result["eval_seconds"] = time.perf_counter() - t0
    result["eval_compilations"] = s.eval_step._cache_size()  # pylint: disable=protected-access
  return result


# --- Summary and table -------------------------------------------------------------


def summarize(raw: dict, timed=None, peak_tflops: float | None = None) -> dict:
  """One table column from a run's raw measurements.

  Args:
    raw: from `run_jax` or `run_torch`.
    timed: which steps count in the rates (default: the run's own `timed`;
      the PyTorch column uses the JAX run's, so both time the same steps).
    peak_tflops: per-chip peak for MFU; None: detected from the device kind
      (JAX runs only), or no MFU.
  """
  timed = raw.get("timed") if timed is None else timed
  timed = [True] * len(raw["step_times"]) if timed is None else timed
  row = timing_summary(raw["step_times"], raw["examples"], raw["real_tokens"],
                       raw["padded_tokens"], timed)
  # Padding of the configured batching: every step run, timed or not.
  row["padding_efficiency"] = float(np.sum(raw["real_tokens"]) /
                                    np.sum(raw["padded_tokens"]))
  row["framework"] = raw["framework"]
  row["train_seconds"] = raw["train_seconds"]
  row["final_loss"] = raw["final_loss"]
  row["eval"] = raw.get("eval", {})
  if raw["framework"] == "jax":
    t = np.asarray(timed, bool)
    seconds = float(np.asarray(raw["step_times"])[t].sum())
    widths = np.asarray(raw["width"])[t]
    row["mean_width"] = float(widths.mean())
    row["flops_per_token"] = flops_per_token(
        raw["num_layers"], raw["hidden"], row["mean_width"],
        raw["matmul_params_per_token"])
    row["model_tflops_per_s"] = float(np.asarray(raw["model_flops"])[t].sum()) / seconds / 1e12
    row["padded_tflops_per_s"] = float(np.asarray(raw["padded_flops"])[t].sum()) / seconds / 1e12
    peak = peak_tflops or detect_peak_tflops(raw["device_kind"])
    row["peak_tflops"] = peak * raw["num_devices"] if peak else None
    if peak:
      row["mfu"] = row["model_tflops_per_s"] / row["peak_tflops"]
      row["mfu_padded"] = row["padded_tflops_per_s"] / row["peak_tflops"]
    cost = raw.get("cost_analysis")
    if cost and "skipped" in cost:
      row["cost_analysis"] = cost
    elif cost:
      row["cost_analysis"] = dict(cost, ratio=cost["compiled"] / cost["analytic"])
    for key in ("train_compilations", "train_compilations_after_epoch_1",
                "compile_seconds", "peak_memory_bytes", "device", "buckets",
                "eval_compilations", "steps", "dtype", "time_to_first_step",
                "eval_seconds"):
      row[key] = raw.get(key)
    pipe = raw["pipeline"]
    row["pipeline"] = dict(pipe, vs_step=pipe["batches_per_s"] * row["step_ms_median"] / 1e3)
  else:
    row["mean_width"] = float(np.mean(np.asarray(raw["width"])[np.asarray(timed, bool)]))
    name = raw.get("device_name", "CPU")
    row["device"] = (f"{name}, torch {raw['torch']}"
                     + (f", {raw['threads']} threads" if name == "CPU" else "")
                     + (", bf16 autocast" if raw.get("bf16") else "")
                     + f", attention {raw['attn_implementation']}, "
                     f"{raw['order']} batches"
                     + (", malloc retain" if raw.get("malloc_retain") else ""))
    row["runner"] = raw.get("runner", "loop")
    row["peak_memory_bytes"] = raw.get("peak_memory_bytes")
    row["eval_seconds"] = raw.get("eval_seconds")
  return row


def _fmt_num(x, digits=1):
  if x is None:
    return "n/a"
  if abs(x) >= 1e4:
    return f"{x:,.0f}"
  return f"{x:.{digits}f}"


def format_table(columns: list[dict], ratios=None) -> str:
  """A markdown table: one row per quantity, one column per run (+ ratio).

  Args:
    columns: `summarize` outputs: ours, then optionally PyTorch's, with a
      speed-up column (ours faster when > 1).
    ratios: per-repeat examples/s ratios to list under the table.
  """
  names = [("ours (JAX)" if c["framework"] == "jax" else
            "HF Trainer" if c.get("runner") == "trainer" else "HF PyTorch")
           for c in columns]
  with_ratio = len(columns) == 2
  header = ["quantity"] + names + (["speed-up"] if with_ratio else [])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]

  def add(label, key=None, fmt=_fmt_num, value=None, ratio=None, **kw):
    cells = []
    vals = []
    for c in columns:
      v = value(c) if value else c.get(key)
      vals.append(v)
      cells.append(v if isinstance(v, str) else fmt(v, **kw) if v is not None
                   else "n/a")
    if with_ratio:
      if ratio and all(isinstance(v, (int, float)) and v for v in vals):
        # Ours over theirs for rates, theirs over ours for times: > 1 is faster.
        speedup = vals[0] / vals[1] if ratio == "rate" else vals[1] / vals[0]
        cells.append(f"{speedup:.2f}x")
      else:
        cells.append("")
    lines.append("| " + " | ".join([label] + cells) + " |")

  add("device", "device", fmt=str)
  add("training examples/s", "examples_per_s", ratio="rate")
  add("real (non-pad) tokens/s", "real_tokens_per_s", ratio="rate")
  add("padded tokens/s", "padded_tokens_per_s", ratio="rate")
  add("padding efficiency (real/padded)", "padding_efficiency", digits=3)
  add("mean padded length", "mean_width")
  add("step time median ms", "step_ms_median", ratio="time")
  add("step time p10 / p90 ms", value=lambda c: (
      f"{c['step_ms_p10']:.1f} / {c['step_ms_p90']:.1f}"))
  add("timed steps (of all)", value=lambda c: f"{c['timed_steps']}")
  add("wall time of all steps s (incl. compile)", "train_seconds", ratio="time")
  add("model GFLOP/token (analytic, at mean length)",
      value=lambda c: c.get("flops_per_token") and c["flops_per_token"] / 1e9,
      digits=4)
  add("compiled / analytic FLOPs (cost_analysis; CPU only)", value=lambda c: (
      None if not c.get("cost_analysis") else
      "n/a (library calls not counted)" if "skipped" in c["cost_analysis"] else
      f"{c['cost_analysis']['ratio']:.3f} at [{c['cost_analysis']['rows']}, "
      f"{c['cost_analysis']['width']}]"))
  add("model TFLOP/s (real tokens)", "model_tflops_per_s", digits=3)
  add("peak TFLOP/s (all devices)", "peak_tflops")
  add("MFU (real tokens) / on padded", value=lambda c: (
      f"{100 * c['mfu']:.1f}% / {100 * c['mfu_padded']:.1f}%"
      if c.get("mfu") is not None else None))
  add("compilations train / eval", value=lambda c: (
      f"{c['train_compilations']} / {c['eval_compilations']} "
      f"(buckets {tuple(c['buckets'])})" if "train_compilations" in c else None))
  add("compilations after epoch 1", "train_compilations_after_epoch_1", fmt=str)
  add("compile time s (trace + lower + XLA)", "compile_seconds")
  add("time to first step s (build + compile + step 1)", "time_to_first_step")
  add("eval s (compiled before step 1)", "eval_seconds", ratio="time")
  add("host pipeline batches/s / examples/s", value=lambda c: (
      f"{c['pipeline']['batches_per_s']:.0f} / "
      f"{c['pipeline']['examples_per_s']:.0f}" if "pipeline" in c else None))
  add("host pipeline vs model step rate", value=lambda c: (
      f"{c['pipeline']['vs_step']:.0f}x" if "pipeline" in c else None))
  add("peak device memory", value=lambda c: (
      f"{c['peak_memory_bytes'] / 2**30:.2f} GiB"
      if c.get("peak_memory_bytes") else "n/a"))
  add("final training loss", "final_loss", digits=4)
  metric_names = sorted({f"{split}/{m}" for c in columns
                         for split, ms in c["eval"].items() for m in ms})
  for name in metric_names:
    split, metric = name.split("/", 1)
    add(f"dev {name}", value=lambda c, s=split, m=metric:
        c["eval"].get(s, {}).get(m), digits=4)
  out = "\n".join(lines)
  if ratios:
    out += ("\n\nexamples/s ratio per repeat: "
            + ", ".join(f"{r:.2f}x" for r in ratios))
  return out


def _median_columns(columns: list[dict]) -> dict:
  """Median of each numeric top-level field over repeats; the rest from the first."""
  out = dict(columns[0])
  for key, value in columns[0].items():
    if isinstance(value, float):
      out[key] = float(np.median([c[key] for c in columns]))
  return out


def benchmark(config, steps: int | None = None, warmup: int = 3,
              peak_tflops: float | None = None, repeats: int = 1,
              devices=None, profile_dir: str | None = None,
              baseline=None) -> dict:
  """The whole benchmark: `repeats` x (JAX run [, baseline run]).

  Args:
    config: the experiment config.
    steps, warmup: see `run_jax`; `steps` defaults to the config's run.
    peak_tflops: per-chip peak for MFU (default: from the device kind).
    repeats: alternate the runs this many times; medians are reported.
    devices: the devices of the mesh (default: all).
    profile_dir: a `jax.profiler` trace of the first repeat's steps after
      the warmup (see `run_jax`).
    baseline: `(run, steps) -> raw` measurements of another framework on the
      same work, called after each JAX run (the Hugging Face PyTorch runs of
      `benchmarks/compare_torch.py`); its column shares the JAX run's timed
      steps.

  Returns:
    {"table": markdown, "columns": [summaries], "raw": [raw runs],
     "ratios": [examples/s ratio per repeat]}.
  """
  if warmup < 0:
    raise BenchError(f"--warmup={warmup}: must be >= 0")
  if repeats < 1:
    raise BenchError(f"--repeats={repeats}: must be >= 1")
  if peak_tflops is not None and peak_tflops <= 0:
    raise BenchError(f"--peak_tflops={peak_tflops}: must be > 0 (omit it to "
                     "detect the peak from the device kind)")
  started = time.perf_counter()
  s = setup(config, devices)
  steps = steps or s.total_steps
  if steps <= warmup:
    raise BenchError(f"--steps={steps} must exceed --warmup={warmup}")
  raws, jax_cols, other_cols, ratios = [], [], [], []
  for repeat in range(repeats):
    if repeat:
      started = time.perf_counter()
      s = setup(config, devices)  # a Run trains once: fresh state
    raw = run_jax(s, steps, warmup, started=started,
                  profile_dir=profile_dir if not repeat else None)
    raws.append(raw)
    jax_cols.append(summarize(raw, peak_tflops=peak_tflops))
    if baseline is not None:
      other = baseline(s, steps)
      raws.append(other)
      other_cols.append(summarize(other, timed=raw["timed"]))
      ratios.append(jax_cols[-1]["examples_per_s"] / other_cols[-1]["examples_per_s"])
  columns = [_median_columns(jax_cols)]
  if baseline is not None:
    columns.append(_median_columns(other_cols))
  return {"table": format_table(columns, ratios if repeats > 1 else None),
          "columns": columns, "raw": raws, "ratios": ratios}


# --- CLI -------------------------------------------------------------------------


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  f = flags.FLAGS
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  # Taken before the run: once it starts, the run is the load.
  header = (f"{time.strftime('%Y-%m-%d %H:%M')}, load average (1 min) at "
            f"start {load:.2f}, {len(os.sched_getaffinity(0))} cores\n")
  if f.abstract_flops:
    # bert-base (BertConfig() defaults), no checkpoint: is the compiled step
    # doing the model's work and no more (no recomputation)?
    if f.abstract_flops < 0 or f.abstract_batch <= 0:
      print(f"error: --abstract_flops={f.abstract_flops} and --abstract_batch="
            f"{f.abstract_batch} must be positive", file=sys.stderr)
      sys.exit(2)
    counted = abstract_step_flops(BertConfig(), f.abstract_batch, f.abstract_flops)
    print(header)
    print(f"bert-base train step [{f.abstract_batch}, {f.abstract_flops}]: "
          f"compiled {counted['compiled'] / 1e9:.1f} GFLOP, analytic "
          f"{counted['analytic'] / 1e9:.1f} GFLOP, ratio {counted['ratio']:.3f}; "
          f"analytic per token {counted['analytic'] / f.abstract_batch / f.abstract_flops / 1e9:.4f} GFLOP")
    return
  if f.compare_torch:
    print("error: the Hugging Face PyTorch comparison lives outside the "
          "library now: python benchmarks/compare_torch.py with the same "
          "flags (add --torch_trainer for transformers.Trainer)",
          file=sys.stderr)
    sys.exit(2)
  if f.config is None:
    print("error: --config is required (experiments/<name>.py[:arg]), or "
          "--abstract_flops=SEQ_LEN for the bert-base FLOP check", file=sys.stderr)
    sys.exit(2)
  print(header)
  run_and_print(f, baseline=None)


def run_and_print(f, baseline=None) -> dict:
  """The CLI's run: `benchmark` of the flags' config, the table printed.

  Shared with `benchmarks/compare_torch.py`, which passes its baseline. A
  config, data or setting mistake is one `error:` line and exit status 2.
  """
  try:
    validate(f.config)
    host_memory.configure(f.config.cpu_malloc)  # before JAX starts a backend
    xla_flags.configure(f.config.xla_flags)
    result = benchmark(
        f.config, steps=f.steps or None, warmup=f.warmup,
        peak_tflops=f.peak_tflops or None, repeats=f.repeats,
        profile_dir=getattr(f, "profile", "") or None,
        baseline=baseline() if baseline else None)
  except (BenchError, ConfigError, data.DataError, hf.CheckpointError,
          parallelism.ParallelismError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(result["table"])
  if f.json:
    with open(f.json, "w") as out:
      json.dump({k: v for k, v in result.items() if k != "table"}, out,
                default=float)
  return result


def parse_flags(argv):
  """--config/--config.* and the benchmark flags; a bad flag is a message."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config: experiments/<name>.py[:arg]",
      lock_config=True)
  flags.DEFINE_integer("steps", 0, "Updates to run (0: the config's whole run).")
  flags.DEFINE_integer("warmup", 3, "First updates left out of the rates.")
  flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s for MFU "
                     "(0: detect from the device kind; CPUs: none).")
  flags.DEFINE_integer("repeats", 1, "Alternate the runs this many times.")
  flags.DEFINE_boolean("compare_torch", False, "Moved: use "
                       "benchmarks/compare_torch.py (an error names it).")
  flags.DEFINE_string("profile", "", "Write a jax.profiler trace of 5 steps "
                      "after the warmup to this folder (TensorBoard/xprof, "
                      "perfetto_trace.json.gz).")
  flags.DEFINE_string("json", "", "Also write every measurement here.")
  flags.DEFINE_integer("abstract_flops", 0, "Instead of a run: compiled vs "
                       "analytic FLOPs of an abstract bert-base train step "
                       "at this sequence length (no checkpoint, no config).")
  flags.DEFINE_integer("abstract_batch", 8, "Batch size of --abstract_flops.")
  return cli.parse_or_exit(argv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)
