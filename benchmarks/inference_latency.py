r"""Size and inference latency of models: parameters, MB, p50 at batch 1 and 32.

    python benchmarks/inference_latency.py \
        --models teacher=/tmp/distill/mr/teacher/s0,student=/tmp/distill/mr/distill/s0 \
        --seq_len 64 --repeats 50

Each model is a `research.train` workdir (its best checkpoint, made ready
for export by its methods as `research.export` does: a distillation
projection dropped) or a Hugging Face directory (`--task`'s head). For each
it prints one row: encoder layers and width, parameters, the size of its
float32 weights as `research.export` writes them (model.safetensors, MB =
10^6 bytes), and the jitted eval forward's latency on this machine's
default JAX device (the CPU here): the median (p50) and p90 over
`--repeats` calls at batch 1 and at batch 32 of `--seq_len` real tokens,
the examples per second at batch 32 and the speed-up at each batch size
over the first model. Compilation and `--warmup` calls are not timed. On a shared
machine the load of other jobs moves every number: compare rows of one run.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's `research`, run from anywhere
  sys.path.insert(0, ROOT)

from research import methods as methods_lib, restore  # pylint: disable=wrong-import-position
from research.models import hf  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("models", None, "name=path,...: workdirs or Hugging "
                    "Face directories, the first is the speed-up's base.")
flags.DEFINE_string("task", "sequence_classification", "The head of a "
                    "Hugging Face directory.")
flags.DEFINE_integer("num_labels", 2, "Its outputs.")
flags.DEFINE_integer("seq_len", 64, "Tokens per example.")
flags.DEFINE_string("batch_sizes", "1,32", "Batch sizes timed.")
flags.DEFINE_integer("repeats", 50, "Timed calls per batch size.")
flags.DEFINE_integer("warmup", 5, "Untimed calls after compiling.")


def load(path):
  """(model, size of its exported weights in bytes) of a workdir or HF dir."""
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    model, _ = hf.load_pretrained(path, FLAGS.task, FLAGS.num_labels)
    return model, os.path.getsize(os.path.join(path, "model.safetensors"))
  run = restore.restore_run(path)
  model = methods_lib.export_model(run.methods, run.model)
  with tempfile.TemporaryDirectory() as tmp:
    hf.export(model, tmp, run.task.HEAD)
    return model, os.path.getsize(os.path.join(tmp, "model.safetensors"))


def latency(model, batch_size, seq_len, repeats, warmup):
  """Seconds per call (each call waited for) of the jitted forward."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 20000, (batch_size, seq_len)),
                    jnp.int32)
  mask = jnp.ones_like(ids)
  jax.block_until_ready(forward(state, ids, mask))  # compile
  for _ in range(warmup):
    jax.block_until_ready(forward(state, ids, mask))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(forward(state, ids, mask))
    times.append(time.perf_counter() - t0)
  return times


def main(argv):
  del argv
  from flax import nnx  # pylint: disable=import-outside-toplevel
  sizes = [int(b) for b in FLAGS.batch_sizes.split(",")]
  rows = []
  for item in FLAGS.models.split(","):
    name, _, path = item.partition("=")
    model, size = load(path)
    params = sum(int(x.size) for x in jax.tree.leaves(
        nnx.state(model, nnx.Param)))
    timing = {b: latency(model, b, FLAGS.seq_len, FLAGS.repeats,
                         FLAGS.warmup) for b in sizes}
    rows.append((name, model.cfg, params, size, timing))
  base = {b: statistics.median(rows[0][4][b]) for b in sizes}
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs "
        f"visible, load average {os.getloadavg()[0]:.1f}; seq_len "
        f"{FLAGS.seq_len}, {FLAGS.repeats} timed calls")
  head = ["model", "layers x width", "params (M)", "MB"]
  for b in sizes:
    head += [f"p50 b{b} (ms)", f"p90 b{b} (ms)"]
  head += [f"ex/s b{sizes[-1]}"] + [f"speed-up b{b}" for b in sizes]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for name, cfg, params, size, timing in rows:
    cells = [name, f"{cfg.num_hidden_layers} x {cfg.hidden_size}",
             f"{params / 1e6:.1f}", f"{size / 1e6:.1f}"]
    for b in sizes:
      cells += [f"{1e3 * statistics.median(timing[b]):.1f}",
                f"{1e3 * float(np.percentile(timing[b], 90)):.1f}"]
    p50 = {b: statistics.median(timing[b]) for b in sizes}
    cells += [f"{sizes[-1] / p50[sizes[-1]]:.0f}"]
    cells += [f"{base[b] / p50[b]:.2f}x" for b in sizes]
    print("| " + " | ".join(cells) + " |")
  sys.stdout.flush()


if __name__ == "__main__":
  flags.mark_flags_as_required(["models"])
  app.run(main)
