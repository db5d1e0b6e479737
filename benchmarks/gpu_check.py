"""One prepared accelerator check of the training step: where does the time go?

    benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine (bert-base)
    python benchmarks/gpu_check.py --out /tmp/gc --tiny   # CPU smoke (CI)

Everything a short GPU lease should measure, in one run, most important
first, each part written to OUT_DIR as soon as it is done (a run cut short by
its time limit still leaves what it finished):

1. `launch`: the machine's per-kernel cost (PyTorch: many tiny kernels
   launched one by one vs replayed from a CUDA graph). A virtualised GPU can
   charge tens of microseconds per launch, which a step of ~1,500 XLA
   kernels would feel far more than its arithmetic.
2. `bench_b32`: `research.bench` at [32, 128] bf16, the GLUE recipe, with
   `transformers.Trainer` on the same batches and card, and a
   `jax.profiler` trace of a few steps summarised into kernels per step,
   GPU-busy time per step and the most expensive kernels.
3. `variants`: the jitted step alone, one variant at a time (optimiser
   flavours, no dropout, no optimiser at all, cuDNN attention), each timed
   blocking on every step and dispatched ahead.
4. `flags`: the same step under other XLA flags (command buffers, i.e. CUDA
   graphs, off and extended), each in a fresh process since XLA reads its
   flags once.
5. `bench_b256`: `research.bench` at [256, 128] with the Trainer: the step
   cost as a fixed part plus a part per token, and MFU.

The last thing printed is one short table (the device tool returns the end
of the output). `--tiny` runs the same code with a 2-layer model on CPU in
about a minute (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gzip
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# --- The model directory and data (offline: random weights, synthetic text) --


def make_model_dir(path: str, tiny: bool) -> str:
  """A randomly initialised BERT checkpoint with a WordPiece tokenizer.

  bert-base-uncased's shapes (BertConfig() defaults) or, with `tiny`, 2
  layers of width 64. The vocabulary is synthetic ("w0" ... "wN"), so any
  text of such words tokenises to one token per word.
  """
  import transformers  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  os.makedirs(path, exist_ok=True)
  cfg = (transformers.BertConfig(hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128,
                                 vocab_size=1000)
         if tiny else transformers.BertConfig())
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  vocab = specials + [f"w{i}" for i in range(cfg.vocab_size - len(specials))]
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)
  transformers.BertForSequenceClassification(cfg).save_pretrained(path)
  return path


def make_data(path: str, rows: int, eval_rows: int, words: int, vocab: int,
              seed: int = 0) -> tuple[str, str]:
  """train.tsv / dev.tsv of random word sequences with a learnable label."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  files = []
  for name, n in (("train.tsv", rows), ("dev.tsv", eval_rows)):
    file = os.path.join(path, name)
    files.append(file)
    if os.path.exists(file):
      continue
    with open(file, "w") as f:
      f.write("sentence\tlabel\n")
      for _ in range(n):
        ids = rng.integers(0, vocab - 5, size=rng.integers(words // 2, words + 1))
        # Label: is the first word's id even (learnable, balanced).
        f.write(" ".join(f"w{i}" for i in ids) + f"\t{int(ids[0] % 2)}\n")
  return files[0], files[1]


def make_config(model_dir, train_file, dev_file, batch, length, tiny,
                **overrides):
  """experiments/glue_sst2.py on local files, one bucket, bf16 on GPUs."""
  from experiments import glue_sst2  # pylint: disable=import-outside-toplevel
  config = glue_sst2.get_config("model=bert-base-uncased")
  config.unlock()
  config.model.name = model_dir
  config.data.source = "local"
  config.data.train_file = train_file
  config.data.eval_file = dev_file
  config.data.label_names = ()
  config.data.buckets = (length,)
  config.data.max_length = length
  config.data.cache_dir = os.path.join(os.path.dirname(train_file), "cache")
  config.batch_size = batch
  config.eval_batch_size = 64
  config.model.dtype = "float32" if tiny else "bfloat16"
  config.compilation_cache_dir = ""  # set once by main()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.lock()
  return config


# --- 1. Per-launch cost of the machine ---------------------------------------


def launch_cost(n: int = 2000) -> dict:
  """Microseconds per tiny kernel: launched one by one, and from a graph."""
  import torch  # pylint: disable=import-outside-toplevel
  if not torch.cuda.is_available():
    return {"skipped": "no CUDA device for torch"}
  x = torch.zeros(1024, device="cuda")
  for _ in range(100):
    x.add_(1)
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(n):
    x.add_(1)
  host = time.perf_counter() - t0
  torch.cuda.synchronize()
  eager = time.perf_counter() - t0
  graph = torch.cuda.CUDAGraph()
  stream = torch.cuda.Stream()
  with torch.cuda.stream(stream):
    with torch.cuda.graph(graph):
      for _ in range(200):
        x.add_(1)
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(n // 200):
    graph.replay()
  torch.cuda.synchronize()
  replay = time.perf_counter() - t0
  return {"kernels": n, "enqueue_us_per_kernel": host / n * 1e6,
          "eager_us_per_kernel": eager / n * 1e6,
          "graph_us_per_kernel": replay / n * 1e6}


def matmul_ceiling(n: int = 8192, reps: int = 10) -> dict:
  """bf16 TFLOP/s of one large matrix product, PyTorch and XLA, random data."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  out = {"n": n}
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    c = mm(a, b)
  c.block_until_ready()
  out["jax_tflops"] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
  try:
    import torch  # pylint: disable=import-outside-toplevel
    if torch.cuda.is_available():
      x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
      y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
      x @ y
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      for _ in range(reps):
        x @ y
      torch.cuda.synchronize()
      out["torch_tflops"] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
  except ImportError:
    pass
  return out


# --- 2./5. The benchmark beside the Trainer, and a trace ----------------------


def trace_summary(trace_dir: str, steps: int) -> dict:
  """Kernels and busy time per step from a `jax.profiler` perfetto trace.

  Reads `perfetto_trace.json.gz` (`create_perfetto_trace=True`): complete
  events ("ph": "X") grouped by process; a process whose name has "GPU"
  or "gpu" (the device streams) holds the kernels. Busy time is the union
  of the kernel intervals, so overlapping streams are not counted twice.
  """
  files = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"),
                    recursive=True)
  if not files:
    return {"error": f"no perfetto trace under {trace_dir}"}
  with gzip.open(files[0], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e.get("args", {}).get("name", "")
           for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in names.items()
                 if "gpu" in name.lower() or "/device:" in name.lower()}
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]
  host = [e for e in events if e.get("ph") == "X" and e.get("pid") not in device_pids]
  by_name: dict[str, list[float]] = {}
  for e in kernels:
    by_name.setdefault(e.get("name", "?"), []).append(float(e.get("dur", 0)))
  intervals = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
                     for e in kernels)
  busy, end = 0.0, float("-inf")
  for lo, hi in intervals:
    if hi > end:
      busy += hi - max(lo, end)
      end = hi
  span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
  top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
  host_top = {}
  for e in host:
    host_top.setdefault(e.get("name", "?"), []).append(float(e.get("dur", 0)))
  host_top = sorted(host_top.items(), key=lambda kv: -sum(kv[1]))[:15]
  return {
      "file": files[0], "device_processes": sorted(names[p] for p in device_pids),
      "steps": steps, "kernels_per_step": len(kernels) / steps,
      "gpu_busy_ms_per_step": busy / 1e3 / steps,
      "kernel_sum_ms_per_step": sum(map(sum, by_name.values())) / 1e3 / steps,
      "span_ms_per_step": span / 1e3 / steps,
      "top_kernels": [{"name": n[:120], "count_per_step": len(d) / steps,
                       "ms_per_step": sum(d) / 1e3 / steps} for n, d in top],
      "top_host_events": [{"name": n[:120], "count": len(d),
                           "ms_total": sum(d) / 1e3} for n, d in host_top],
  }


def run_bench(config, steps, warmup, compare) -> dict:
  """research.bench's benchmark: ours beside the Trainer on the same batches."""
  from research import bench  # pylint: disable=import-outside-toplevel
  import compare_torch  # pylint: disable=import-outside-toplevel  # benchmarks/
  t0 = time.perf_counter()
  result = bench.benchmark(
      config, steps=steps, warmup=warmup,
      baseline=compare_torch.make_baseline(trainer=True) if compare else None)
  return {"table": result["table"], "columns": result["columns"],
          "ratios": result["ratios"], "seconds": time.perf_counter() - t0}


# --- 3./4. The jitted step alone, variant by variant ---------------------------


def flat_adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0,
               mask=None, clip_norm=0.0):
  """`fused_adamw`'s maths over one concatenated buffer (multi-tensor style).

  The candidate for a step that launches one kernel per parameter leaf:
  the moments live as one flat float32 vector each, the gradients are
  concatenated once, the update is one element-wise kernel and the result
  is split back per leaf.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.flatten_util import ravel_pytree  # pylint: disable=import-outside-toplevel
  from research.training import optimizers  # pylint: disable=import-outside-toplevel
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    flat, _ = ravel_pytree(params)
    zero = lambda: jnp.zeros([], jnp.int32)  # pylint: disable=unnecessary-lambda-assignment
    return optimizers.FusedAdamWState(
        count=zero(), mu=jnp.zeros_like(flat), nu=jnp.zeros_like(flat),
        notfinite_count=zero(), last_finite=jnp.array(True),
        total_notfinite=zero())

  def update(grads, state, params):
    g, unravel = ravel_pytree(grads)
    p, _ = ravel_pytree(params)
    decay = mask(params) if callable(mask) else mask
    d, _ = ravel_pytree(jax.tree.map(
        lambda x, m: jnp.full(x.shape, m, jnp.float32), params, decay))
    norm = jnp.sqrt(jnp.sum(jnp.square(g)))
    finite = jnp.isfinite(norm)
    count = optax.safe_increment(state.count)
    lr = schedule(state.count)
    scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm) if clip_norm > 0 else 1.0
    g = g * scale
    mu = jnp.where(finite, (1 - b1) * g + b1 * state.mu, state.mu)
    nu = jnp.where(finite, (1 - b2) * g * g + b2 * state.nu, state.nu)
    u = (mu / (1 - b1 ** count)) / (jnp.sqrt(nu / (1 - b2 ** count)) + eps)
    u = u + weight_decay * d * p
    updates = unravel(jnp.where(finite, -lr * u, 0.0))
    return updates, optimizers.FusedAdamWState(
        count=jnp.where(finite, count, state.count), mu=mu, nu=nu,
        notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1),
        last_finite=finite,
        total_notfinite=state.total_notfinite + 1 - finite.astype(jnp.int32))

  return optax.GradientTransformation(init, update)


def time_step(config, tx_name: str = "config", steps: int = 20,
              trace_dir: str | None = None) -> dict:
  """The jitted update alone on one batch shape: compile, block, dispatch.

  Built by `research.train.build` (the step training runs); `tx_name`
  "flat" or "none" swaps in another optimiser over the same loss.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from research import methods as methods_lib  # pylint: disable=import-outside-toplevel
  from research import parallelism, train  # pylint: disable=import-outside-toplevel
  from research.training import optimizers, steps as steps_lib  # pylint: disable=import-outside-toplevel
  run = train.build(config, None)
  state, step = run.state, run.train_step
  if tx_name != "config":
    opt = config.optimizer
    if tx_name == "flat":
      schedule = optimizers.learning_rate_schedule(opt, run.total_steps)
      tx = flat_adamw(schedule, opt.b1, opt.b2, opt.eps, opt.weight_decay,
                      optimizers.weight_decay_mask, opt.grad_clip_norm)
    else:
      # Forward and backward only (the wrapper gives the skip counters the
      # step reports).
      tx = optax.apply_if_finite(optax.set_to_zero(), 10)
    params = state["params"]
    state = {"params": params, "opt_state": tx.init(params)}
    sharding = parallelism.state_shardings(
        state, run.mesh, config.parallelism.logical_axis_rules,
        config.parallelism.strategy)
    state = jax.device_put(state, sharding)
    step = steps_lib.make_train_step(
        tx, methods_lib.wrap_loss(run.methods, run.task.loss_fn(run.graphdef)),
        transform=run.task.transform, seed=config.seed, mesh=run.mesh,
        strategy=config.parallelism.strategy, state_sharding=sharding,
        frozen_sharding=run.frozen_sharding)
  frozen = run.frozen
  batch = parallelism.shard_batch(run.train_batches.batch_at(0),
                                  run.batch_sharding)
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, batch, 0).compile()
  compile_s = time.perf_counter() - t0
  state, m = step(state, frozen, batch, 0)
  jax.block_until_ready((state, m))
  blocked = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = step(state, frozen, batch, i + 1)
    jax.block_until_ready((state, m))
    blocked.append(time.perf_counter() - t)
  host = []
  t = time.perf_counter()
  for i in range(steps):
    h = time.perf_counter()
    state, m = step(state, frozen, batch, steps + i + 1)
    host.append(time.perf_counter() - h)
  jax.block_until_ready((state, m))
  ahead = (time.perf_counter() - t) / steps
  text = compiled.as_text() or ""
  traced = {}
  if trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for i in range(5):
        state, m = step(state, frozen, batch, 2 * steps + i + 1)
        jax.block_until_ready((state, m))
    traced = {"trace": trace_summary(trace_dir, 5)}
  return {**traced, "compile_s": compile_s,
          "blocked_ms": statistics.median(blocked) * 1e3,
          "ahead_ms": ahead * 1e3,
          "host_ms_per_call": statistics.median(host) * 1e3,
          "hlo_fusions": text.count(" fusion("),
          "hlo_custom_calls": text.count("custom-call("),
          "loss": float(np.asarray(m["loss"]))}


VARIANTS = {
    # name: (optimiser, config overrides)
    "ours": ("config", {}),
    "optax_chain": ("config", {"optimizer.fused": False}),
    "flat_adamw": ("flat", {}),
    "no_dropout": ("config", {"model.hidden_dropout": 0.0,
                              "model.attention_dropout": 0.0}),

    "no_dropout_cudnn": ("config", {"model.hidden_dropout": 0.0,
                                    "model.attention_dropout": 0.0,
                                    "model.attention_impl": "cudnn"}),
}

_ALL_GRAPHS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,"
               "CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL "
               "--xla_gpu_graph_min_graph_size=1")
FLAGS = {
    # name: (variant of VARIANTS, XLA_FLAGS)
    "command_buffer_off": ("ours", "--xla_gpu_enable_command_buffer="),
    "command_buffer_all": ("ours", _ALL_GRAPHS),
    "flat_adamw+command_buffer_all": ("flat_adamw", _ALL_GRAPHS),
    "autotune_0": ("ours", "--xla_gpu_autotune_level=0"),
    # config.xla_flags=auto turns Triton GEMMs off (measured: compile 41 ->
    # 20 s, ~7% faster); this is the comparison with XLA's own default.
    "triton_gemm_on": ("ours", "--xla_gpu_enable_triton_gemm=true"),
}


def variant_in_subprocess(args, variant, flags, timeout, trace_name="") -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out,
         "--work", args.work, "--only_variant", variant,
         "--trace_name", trace_name] + (["--tiny"] if args.tiny else [])
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  if proc.returncode != 0:
    return {"error": proc.stderr[-2000:]}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["process_s"] = time.perf_counter() - t0
  return result


# --- Driver --------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="results folder")
  parser.add_argument("--work", default="/tmp/gpu_check", help="scratch folder")
  parser.add_argument("--tiny", action="store_true", help="CPU smoke settings")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="skip parts that would start after this many seconds")
  parser.add_argument("--only_variant", default="", help=argparse.SUPPRESS)
  parser.add_argument("--trace_name", default="", help=argparse.SUPPRESS)
  parser.add_argument("--parts", default="launch,ceiling,bench_b32,flags,bench_b256,variants")
  parser.add_argument("--flags", default=",".join(FLAGS), help="FLAGS entries to run")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="VARIANTS entries to run")
  args = parser.parse_args()
  # What research.train sets before JAX starts (config.xla_flags="auto");
  # a child's own XLA_FLAGS entries win over these.
  from research.training import xla_flags  # pylint: disable=import-outside-toplevel
  xla_flags.configure("auto")
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.work, exist_ok=True)
  start = time.perf_counter()
  tiny = args.tiny
  model_dir = make_model_dir(os.path.join(args.work, "model_tiny" if tiny else "model_base"), tiny)
  train_file, dev_file = make_data(args.work, rows=512 if tiny else 12000,
                                   eval_rows=64 if tiny else 872,
                                   words=40 if tiny else 160,
                                   vocab=1000 if tiny else 30522)
  length = 32 if tiny else 128
  small, large = (8, 32) if tiny else (32, 256)
  cfg = lambda batch, **kw: make_config(model_dir, train_file, dev_file, batch,  # pylint: disable=unnecessary-lambda-assignment
                                        length, tiny, **kw)

  if args.only_variant:  # a child process of `flags`
    tx, over = VARIANTS[args.only_variant]
    trace = os.path.join(args.out, args.trace_name) if args.trace_name else None
    print(json.dumps(time_step(cfg(small, **over), tx, steps=5 if tiny else 20,
                               trace_dir=trace)))
    return

  results = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
  try:
    import jax  # pylint: disable=import-outside-toplevel
    # A fresh persistent cache: the first compile of each program is cold
    # (what a fresh machine pays); the traced rerun of the same step, and the
    # same step timed alone, are cache hits instead of 30 s compiles.
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.work, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    results["env"] = {"jax": jax.__version__,
                      "devices": [str(d) for d in jax.devices()],
                      "device_kind": jax.devices()[0].device_kind,
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}
    import flax  # pylint: disable=import-outside-toplevel
    results["env"]["flax"] = flax.__version__
  except Exception as e:  # pylint: disable=broad-except
    results["env"] = {"error": repr(e)}

  def save():
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
      json.dump(results, f, indent=1, default=str)

  def part(name, fn):
    if name not in args.parts.split(","):
      return
    if time.perf_counter() - start > args.budget_s:
      results[name] = {"skipped": "time budget"}
      save()
      return
    t0 = time.perf_counter()
    print(f"== {name} (at {t0 - start:.0f} s)", flush=True)
    try:
      results[name] = fn()
    except Exception:  # pylint: disable=broad-except
      results[name] = {"error": traceback.format_exc()[-3000:]}
    results[name + "_seconds"] = time.perf_counter() - t0
    print(json.dumps(results[name], default=str)[:3000], flush=True)
    save()

  on_gpu = results.get("env", {}).get("devices", [""])[0].lower().startswith(("cuda", "gpu"))
  compare = True  # the Trainer on the same device (CPU in --tiny)
  steps = (6, 2) if tiny else (60, 10)
  step_count = 5 if tiny else 20

  def each(table, fn):
    """One entry per name, saved as it finishes; skipped past the budget."""
    def run():
      out = results.setdefault(table["_name"], {})
      for name, spec in table.items():
        if name == "_name":
          continue
        if time.perf_counter() - start > args.budget_s:
          out[name] = {"skipped": "time budget"}
          continue
        try:
          out[name] = fn(*spec)
        except Exception:  # pylint: disable=broad-except
          out[name] = {"error": traceback.format_exc()[-2000:]}
        print(f"  {name}: {json.dumps(out[name], default=str)[:400]}", flush=True)
        save()
      return out
    return run

  def variant(tx, over):
    if not on_gpu and over.get("model.attention_impl") == "cudnn":
      return {"skipped": "needs a GPU"}
    return time_step(cfg(small, **over), tx, steps=step_count)

  def flagged(name, flags):
    if not (on_gpu or tiny):
      return {"skipped": "GPU only"}
    # The step traced with command buffers off: kernels replayed from a CUDA
    # graph are not reported one by one by the profiler (the first GPU run
    # saw only the model load's kernels, none of the steps').
    trace = "trace_step" if "enable_command_buffer=" in flags and name.endswith("off") else ""
    return variant_in_subprocess(args, name, flags, 60 if tiny else 150, trace)

  part("launch", launch_cost)
  part("ceiling", (lambda: matmul_ceiling(512 if tiny else 8192)))
  part("bench_b32", lambda: run_bench(cfg(small), *steps, compare))
  part("flags", each(dict({k: FLAGS[k] for k in args.flags.split(",") if k},
                           _name="flags"), flagged))
  part("bench_b256", lambda: run_bench(cfg(large), *((4, 1) if tiny else (30, 5)), compare))
  part("variants", each(dict({k: VARIANTS[k] for k in args.variants.split(",")
                              if k},
                             _name="variants"), variant))
  results["total_seconds"] = time.perf_counter() - start
  save()
  print(summary_table(results))


def summary_table(results: dict) -> str:
  """The short table printed last."""
  rows = [f"gpu_check {results.get('started')} {results.get('env', {}).get('device_kind')} "
          f"jax {results.get('env', {}).get('jax')} total {results.get('total_seconds', 0):.0f} s"]
  launch = results.get("launch", {})
  if "eager_us_per_kernel" in launch:
    rows.append(f"launch us/kernel: enqueue {launch['enqueue_us_per_kernel']:.1f}, "
                f"eager {launch['eager_us_per_kernel']:.1f}, graph {launch['graph_us_per_kernel']:.1f}")
  for name in ("bench_b32", "bench_b256"):
    r = results.get(name, {})
    cols = r.get("columns") or []
    if cols:
      line = [f"{name}: ours {cols[0].get('examples_per_s', 0):.0f} ex/s "
              f"median {cols[0].get('step_ms_median', 0):.1f} ms"]
      if len(cols) > 1:
        line.append(f"Trainer {cols[1].get('examples_per_s', 0):.0f} ex/s "
                    f"median {cols[1].get('step_ms_median', 0):.1f} ms, ratio "
                    f"{cols[0].get('examples_per_s', 0) / max(cols[1].get('examples_per_s', 1e-9), 1e-9):.2f}x")
      line.append(f"MFU {cols[0].get('mfu')}")
      rows.append("; ".join(line))
    elif r:
      rows.append(f"{name}: {str(r)[:300]}")
    t = r.get("trace", {})
    if "kernels_per_step" in t:
      rows.append(f"  trace: {t['kernels_per_step']:.0f} kernels/step, GPU busy "
                  f"{t['gpu_busy_ms_per_step']:.1f} ms/step, span {t['span_ms_per_step']:.1f} ms/step; top: "
                  + ", ".join(f"{k['name'][:40]} {k['ms_per_step']:.2f}" for k in t["top_kernels"][:4]))
    elif t:
      rows.append(f"  trace: {str(t)[:300]}")
  for group in ("variants", "flags"):
    for name, v in (results.get(group) or {}).items():
      t = v.get("trace", {}) if isinstance(v, dict) else {}
      if "kernels_per_step" in t:
        rows.append(f"  {name} trace: {t['kernels_per_step']:.0f} kernels/step, GPU busy "
                    f"{t['gpu_busy_ms_per_step']:.1f} ms/step; top: "
                    + ", ".join(f"{k['name'][:40]} {k['ms_per_step']:.2f}"
                                for k in t["top_kernels"][:5]))
      if isinstance(v, dict) and "blocked_ms" in v:
        rows.append(f"{group}/{name}: blocked {v['blocked_ms']:.1f} ms, ahead "
                    f"{v['ahead_ms']:.1f} ms, host {v['host_ms_per_call']:.1f} ms/call, "
                    f"compile {v['compile_s']:.1f} s, fusions {v['hlo_fusions']}, loss {v['loss']:.4f}")
      else:
        rows.append(f"{group}/{name}: {str(v)[:200]}")
  return "\n".join(rows)


if __name__ == "__main__":
  main()
