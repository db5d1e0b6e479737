"""Hugging Face PyTorch doing the same work as a `research.bench` run.

    python benchmarks/compare_torch.py --config experiments/quickstart.py
    python benchmarks/compare_torch.py --config experiments/quickstart.py \
        --torch_trainer --repeats 3
    python benchmarks/compare_torch.py --config experiments/glue_sst2.py \
        --steps 200 --warmup 20 --config.model.dtype=bfloat16 --torch_trainer

Prints `research.bench`'s table with a second column: `transformers`'
`AutoModelForSequenceClassification` from the same checkpoint, trained in a
subprocess (`torch_worker`) on the same tokenised examples, batch size, max
length, dropout and number of steps, with AdamW as Hugging Face's Trainer
builds it (`fused=True`, no decay on biases and LayerNorm, same lr, betas,
eps, warmup, schedule and clipping), then the same eval metric. Batches
follow Hugging Face's recipe (a random order each epoch, each batch padded to
its longest example by `DataCollatorWithPadding`); `--torch_order=bucketed`
gives PyTorch our batches instead. PyTorch runs where JAX runs (the CPU, or
the same GPU), under bf16 autocast when the config computes in bf16. The
loop is a lean one by default; `--torch_trainer` runs `transformers.Trainer`
itself on the same batches. This lives outside the library package: the
library's benchmark (`research.bench`) takes any baseline as a function
(`benchmark(..., baseline=)`); this is the PyTorch one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from research import bench, cli, train  # pylint: disable=wrong-import-position
from research.bench import BenchError  # pylint: disable=wrong-import-position
from research.metrics import common as metrics_lib  # pylint: disable=wrong-import-position
from research.tasks import common as task_common  # pylint: disable=wrong-import-position
from research.training import host_memory, optimizers  # pylint: disable=wrong-import-position

TORCH_ORDERS = ("random", "bucketed")


def make_baseline(order: str = "random", cpu_malloc: str = "default",
                  trainer: bool = False, threads: int | None = None):
  """`bench.benchmark`'s `baseline`: `(run, steps) -> raw` PyTorch runs.

  Checks what can be checked before any run: the order, and that torch
  (and accelerate for the Trainer) are installed.
  """
  if order not in TORCH_ORDERS:
    raise BenchError(f"--torch_order={order!r}; valid: {', '.join(TORCH_ORDERS)}")
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise BenchError("the PyTorch comparison needs torch: pip install torch") from e
  if trainer:
    try:
      import accelerate  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise BenchError("--torch_trainer needs accelerate (transformers.Trainer"
                       " does): pip install accelerate") from e

  def baseline(run, steps):
    return run_torch(run, steps, order, threads=threads, cpu_malloc=cpu_malloc,
                     trainer=trainer)
  return baseline


def compare(config, steps=None, warmup=3, repeats=1, order="random",
            cpu_malloc="default", trainer=False, peak_tflops=None,
            devices=None) -> dict:
  """`bench.benchmark` with the PyTorch baseline beside every repeat."""
  return bench.benchmark(
      config, steps=steps, warmup=warmup, peak_tflops=peak_tflops,
      repeats=repeats, devices=devices,
      baseline=make_baseline(order, cpu_malloc, trainer))


def run_torch(s: train.Run, steps: int, order: str = "random",
              threads: int | None = None, timeout: float = 3600.0,
              cpu_malloc: str = "default", trainer: bool = False) -> dict:
  """The same work through transformers' PyTorch model, in a subprocess.

  PyTorch runs where JAX does: on the CPU, or on the first GPU when JAX's
  backend is a GPU (one device: the JAX run must be one too). With
  `config.model.dtype=bfloat16` it computes under `torch.autocast` bf16
  (fp32 weights, as our bf16 compute; the Trainer's `bf16=True`). On a GPU
  JAX keeps its preallocated share of memory (75% by default); the PyTorch
  run gets the rest.

  Args:
    s: from `setup` (its tokenised splits are what PyTorch trains on; its
      state is not used).
    steps: updates, as for `run_jax` (gradient accumulation is not mirrored).
    order: "random" (Hugging Face's sampler: a random permutation each epoch)
      or "bucketed" (our batches' examples).
    threads: torch intra-op threads; default: the cores this process may use.
    timeout: seconds before the subprocess is stopped.
    cpu_malloc: "default" (glibc as PyTorch users run it) or "retain" (the
      `host_memory` settings our CPU runs use, applied before torch loads).
    trainer: run `transformers.Trainer` (needs `accelerate`) instead of the
      lean loop: what most Hugging Face users run, with its per-step
      bookkeeping (the loss's NaN check, FLOP counting, callbacks).

  Returns:
    The worker's raw measurements (see `torch_worker`).
  """
  if order not in TORCH_ORDERS:
    raise BenchError(f"--torch_order={order!r}; valid: {', '.join(TORCH_ORDERS)}")
  config = s.config
  if type(s.task).__module__ != "research.tasks.sequence_classification":
    raise BenchError(
        "--compare_torch mirrors transformers' "
        "AutoModelForSequenceClassification: needs "
        f"config.task='sequence_classification', got {config.task!r}")
  if config.optimizer.name != "adamw" or config.optimizer.grad_accum_steps != 1:
    raise BenchError(
        "the PyTorch comparison mirrors AdamW without accumulation: needs "
        "config.optimizer.name='adamw' and config.optimizer.grad_accum_steps=1, "
        f"got {config.optimizer.name!r} and {config.optimizer.grad_accum_steps}")
  if jax.process_count() > 1:
    raise BenchError("the PyTorch comparison runs on one host")
  backend = s.mesh.devices.flat[0].platform
  if backend not in ("cpu", "gpu", "cuda"):
    raise BenchError(f"the PyTorch comparison runs on the CPU or an NVIDIA "
                     f"GPU; this run's devices are {backend!r}")
  if backend != "cpu" and s.mesh.devices.size > 1:
    raise BenchError(
        f"the PyTorch comparison on GPU is one device against one device: this "
        f"mesh has {s.mesh.devices.size}; set "
        "--config.parallelism.mesh_shape='(1, 1, 1)'")
  spe = s.train_batches.steps_per_epoch
  size = config.batch_size
  if order == "bucketed":
    plan = np.stack([s.train_batches._plan(step // spe)[0][step % spe]  # pylint: disable=protected-access
                     for step in range(steps)])
  else:
    # HF's RandomSampler: a fresh permutation per epoch (drop_last, like ours,
    # so that both runs see the same number of examples per step).
    plan = np.concatenate([
        np.random.default_rng([config.seed, 1, e]).permutation(
            len(s.train_split))[:spe * size].reshape(spe, size)
        for e in range(-(-steps // spe))])[:steps]
  eval_name = next((n for n, split in s.eval_splits.items()
                    if split.has_labels), None)
  with tempfile.TemporaryDirectory() as tmp:
    arrays = {"order": plan}
    splits = {"train": s.train_split}
    if eval_name is not None:
      splits["eval"] = s.eval_splits[eval_name]
    for key, split in splits.items():
      arrays.update({f"{key}_input_ids": split.input_ids,
                     f"{key}_token_type_ids": split.token_type_ids,
                     f"{key}_offsets": split.offsets,
                     f"{key}_labels": split.labels})
    np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
    opt = config.optimizer
    spec = {
        "arrays": os.path.join(tmp, "arrays.npz"),
        "out": os.path.join(tmp, "result.json"), "workdir": tmp,
        "model_dir": s.model_dir, "num_labels": config.num_labels,
        "steps": steps, "batch_size": size,
        "eval_batch_size": config.eval_batch_size,
        "seed": config.seed, "metrics": list(config.metrics),
        "threads": threads or len(os.sched_getaffinity(0)),
        "device": "cpu" if backend == "cpu" else "cuda",
        "bf16": config.model.dtype == "bfloat16",
        "config_overrides": task_common.dropout_overrides(config.model),
        **optimizer_spec(opt, s.total_steps),
        "order": order, "cpu_malloc": cpu_malloc, "trainer": trainer,
    }
    with open(os.path.join(tmp, "spec.json"), "w") as f:
      json.dump(spec, f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if backend != "cpu":
      # The GPU JAX runs on (a Trainer seeing several would wrap the model
      # in DataParallel).
      env["CUDA_VISIBLE_DEVICES"] = str(s.mesh.devices.flat[0].local_hardware_id)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker",
         os.path.join(tmp, "spec.json")],
        env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
      raise RuntimeError("the PyTorch run failed:\n" + proc.stderr[-4000:])
    with open(spec["out"]) as f:
      result = json.load(f)
  if eval_name is not None:
    result["eval"] = {eval_name: result.pop("eval")}
  return result


def torch_worker(spec_path: str) -> None:
  """Runs in the subprocess of `run_torch`: HF PyTorch training and eval."""
  # pylint: disable=import-outside-toplevel
  with open(spec_path) as f:
    spec = json.load(f)
  malloc_retain = host_memory.configure(spec["cpu_malloc"])
  import torch
  import transformers
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  transformers.logging.set_verbosity_error()
  device = torch.device(spec["device"])

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  arrays = np.load(spec["arrays"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model_dir"])
  collator = transformers.DataCollatorWithPadding(tokenizer)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      spec["model_dir"], num_labels=spec["num_labels"],
      **spec["config_overrides"]).to(device)
  regression = spec["num_labels"] == 1
  autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16,  # pylint: disable=unnecessary-lambda-assignment
                                    enabled=spec["bf16"])

  def feature(prefix, i):
    lo, hi = arrays[f"{prefix}_offsets"][i:i + 2]
    label = arrays[f"{prefix}_labels"][i]
    return {"input_ids": arrays[f"{prefix}_input_ids"][lo:hi].tolist(),
            "token_type_ids": arrays[f"{prefix}_token_type_ids"][lo:hi].tolist(),
            "attention_mask": [1] * int(hi - lo),
            "labels": float(label) if regression else max(int(label), 0)}

  opt, sched = hf_optimizer(model, spec)
  # What each step's batch holds, from the plan: DataCollatorWithPadding pads
  # a batch to its longest example.
  lengths = np.diff(arrays["train_offsets"])[arrays["order"]]
  rec = {"examples": [int(n) for n in np.full(len(lengths), lengths.shape[1])],
         "real_tokens": [int(n) for n in lengths.sum(axis=1)],
         "width": [int(n) for n in lengths.max(axis=1)]}
  rec["padded_tokens"] = [e * w for e, w in zip(rec["examples"], rec["width"])]
  model.train()
  start = time.perf_counter()
  if spec["trainer"]:
    step_times, final_loss = _torch_trainer_run(
        spec, model, opt, sched, collator,
        [feature("train", int(i)) for i in arrays["order"].ravel()], sync)
  else:
    step_times = []
    for step in range(spec["steps"]):
      t0 = time.perf_counter()
      batch = collator([feature("train", int(i)) for i in arrays["order"][step]])
      batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
      with autocast():
        loss = model(**batch).loss
      loss.backward()
      if spec["grad_clip_norm"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip_norm"])
      opt.step()
      sched.step()
      opt.zero_grad(set_to_none=True)
      sync()
      step_times.append(time.perf_counter() - t0)
    final_loss = float(loss)
  train_seconds = time.perf_counter() - start
  result = {"framework": "torch", "torch": torch.__version__,
            "runner": "trainer" if spec["trainer"] else "loop",
            "device_name": (torch.cuda.get_device_name(device)
                            if device.type == "cuda" else "CPU"),
            "bf16": spec["bf16"], "malloc_retain": malloc_retain,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation,  # pylint: disable=protected-access
            "order": spec["order"], "step_times": step_times, **rec,
            "train_seconds": train_seconds, "final_loss": final_loss,
            "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                                  if device.type == "cuda" else None)}
  if "eval_offsets" in arrays:
    model.eval()
    n, size = len(arrays["eval_offsets"]) - 1, spec["eval_batch_size"]
    preds, labels = [], []
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast():
      for lo in range(0, n, size):
        batch = collator([feature("eval", i) for i in range(lo, min(n, lo + size))])
        logits = model(**{k: v.to(device) for k, v in batch.items()
                          if k != "labels"}).logits.float().cpu()
        preds.append(logits[:, 0].numpy() if regression
                     else logits.argmax(-1).numpy())
        labels.append(arrays["eval_labels"][lo:min(n, lo + size)])
    result["eval_seconds"] = time.perf_counter() - t0
    labels = np.concatenate(labels)
    result["eval"] = metrics_lib.compute(
        spec["metrics"], np.concatenate(preds), labels,
        (labels >= 0).astype(np.float32) if not regression else None)
  with open(spec["out"], "w") as f:
    json.dump(result, f)


def optimizer_spec(opt_config, total_steps) -> dict:
  """What `hf_optimizer` reads, from our `config.optimizer`."""
  return {"lr": opt_config.learning_rate, "b1": opt_config.b1,
          "b2": opt_config.b2, "eps": opt_config.eps,
          "weight_decay": opt_config.weight_decay,
          "schedule": opt_config.schedule,
          "warmup_steps": optimizers.warmup_steps(opt_config, total_steps),
          "total_steps": total_steps,
          "grad_clip_norm": opt_config.grad_clip_norm}


def hf_optimizer(model, spec):
  """(optimizer, scheduler) as Hugging Face's Trainer builds them for our
  `config.optimizer` (`optimizer_spec`): AdamW (fused, its default for
  torch >= 2.8), no weight decay on biases and LayerNorm weights (the 1-D
  parameters), the same warm-up and schedule."""
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers
  named = list(model.named_parameters())
  groups = [{"params": [p for _, p in named if p.ndim >= 2],
             "weight_decay": spec["weight_decay"]},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=(spec["b1"], spec["b2"]),
                          eps=spec["eps"], fused=True)
  sched = transformers.get_scheduler(
      {"constant": "constant_with_warmup"}.get(spec["schedule"], spec["schedule"]),
      opt, num_warmup_steps=spec["warmup_steps"],
      num_training_steps=spec["total_steps"])
  return opt, sched


def _torch_trainer_run(spec, model, opt, sched, collator, features, sync):
  """`transformers.Trainer` on the plan's batches: (step times, last loss).

  The optimiser and schedule are the lean loop's (what the Trainer would
  build, but over the config's whole schedule when --steps is shorter); a
  sequential sampler over the plan's flattened examples makes batch i the
  plan's row i. A step is timed from the end of the previous one, so it
  holds the Trainer's data loading and bookkeeping, as its users get it.
  """
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers

  class StepTimer(transformers.TrainerCallback):

    def __init__(self):
      self.times, self.last = [], None

    def on_train_begin(self, args, state, control, **kwargs):
      sync()
      self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      sync()
      now = time.perf_counter()
      self.times.append(now - self.last)
      self.last = now

  class PlanTrainer(transformers.Trainer):

    last_loss = None

    def _get_train_sampler(self, train_dataset=None):
      return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    def training_step(self, *args, **kwargs):
      self.last_loss = super().training_step(*args, **kwargs)
      return self.last_loss

  args = transformers.TrainingArguments(
      output_dir=os.path.join(spec["workdir"], "trainer"),
      per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
      max_grad_norm=max(spec["grad_clip_norm"], 0.0),  # 0: no clipping
      bf16=spec["bf16"], use_cpu=spec["device"] == "cpu", seed=spec["seed"],
      dataloader_drop_last=True, report_to="none", logging_strategy="no",
      save_strategy="no", eval_strategy="no", disable_tqdm=True)
  timer = StepTimer()
  trainer = PlanTrainer(model=model, args=args, train_dataset=features,
                        data_collator=collator, optimizers=(opt, sched),
                        callbacks=[timer])
  trainer.train()
  return timer.times, float(trainer.last_loss)


# --- CLI -------------------------------------------------------------------------


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  f = flags.FLAGS
  # Taken before the run: once it starts, the run is the load.
  print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average (1 min) at start "
        f"{os.getloadavg()[0]:.2f}, {len(os.sched_getaffinity(0))} cores\n")
  bench.run_and_print(f, baseline=lambda: make_baseline(
      f.torch_order, f.torch_cpu_malloc, f.torch_trainer))


def parse_flags(argv):
  """research.bench's flags plus the PyTorch run's."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config: experiments/<name>.py[:arg]",
      lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_integer("steps", 0, "Updates to run (0: the config's whole run).")
  flags.DEFINE_integer("warmup", 3, "First updates left out of the rates.")
  flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s for MFU.")
  flags.DEFINE_enum("torch_order", "random", TORCH_ORDERS,
                    "PyTorch batches: HF's random order, or ours (bucketed).")
  flags.DEFINE_enum("torch_cpu_malloc", "default", ("default", "retain"),
                    "glibc settings of the PyTorch run: as its users run it, "
                    "or the ones our CPU runs use (config.cpu_malloc).")
  flags.DEFINE_boolean("torch_trainer", False, "Run PyTorch through "
                       "transformers.Trainer (needs accelerate) instead of "
                       "the lean loop.")
  flags.DEFINE_integer("repeats", 1, "Alternate the runs this many times.")
  flags.DEFINE_string("json", "", "Also write every measurement here.")
  return cli.parse_or_exit(argv)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    torch_worker(sys.argv[2])  # the PyTorch subprocess of run_torch
  else:
    from absl import app  # pylint: disable=g-import-not-at-top
    app.run(main, flags_parser=parse_flags)
