"""Training FLOPs of an encoder step: analytic counts, XLA's count, MFU peaks.

`research.bench` reports MFU from these: the model's work on real tokens
(`batch_model_flops`), the padded program's (`padded_batch_flops`), what XLA
counts for the compiled step (`compiled_flops`, CPU only: GPU matmuls are
library calls it does not count), and the bf16 peak of the device
(`detect_peak_tflops`). `abstract_step_flops` checks a bert-base step with no
checkpoint (`python -m research.bench --abstract_flops 128`).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from research import parallelism, tasks
from research.models import BertConfig, create_model
from research.training import optimizers, partition
from research.training.steps import make_train_step

# Dense bf16 peak per chip in TFLOP/s (REFERENCE_NUMBERS.md), matched as a
# substring of the lower-cased `device_kind`; the first match wins, so the
# more specific names come first ("TPU v5 lite" is v5e, "TPU v5" is v5p).
PEAK_TFLOPS = (
    ("h100", 989.0), ("h200", 989.0),
    ("v6 lite", 918.0), ("v6e", 918.0),
    ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v5", 459.0),
    ("v4", 275.0), ("v3", 123.0),
)
def flops_per_token(num_layers: int, hidden: int, seq_len: int,
                    matmul_params: int) -> float:
  """Training FLOPs per token (forward + backward) of the encoder.

      6 * matmul_params + 12 * num_layers * hidden * seq_len

  A weight of a dense layer does one multiply-add (2 FLOPs) per token in the
  forward pass and two in the backward pass (input and weight gradients):
  6 per weight. Attention scores (QK^T) and the weighted sum (probs @ V) are
  2 * seq_len * hidden FLOPs each per token and layer forward, so
  4 * seq_len * hidden, times 3 with the backward pass. For BERT
  matmul_params = 12 * num_layers * hidden^2 (Q, K, V, output: 4 hidden^2;
  the MLP: 2 * hidden * 4 hidden), e.g. bert-base at 128: 0.524 GFLOP.

  Args:
    num_layers: transformer layers.
    hidden: hidden size.
    seq_len: the (padded) sequence length attention runs over.
    matmul_params: the non-embedding matmul weights applied to every token
      (`matmul_params`); embeddings are gathers, not matmuls.
  """
  return 6.0 * matmul_params + 12.0 * num_layers * hidden * seq_len


def matmul_params(model, head_fraction: float = 1.0) -> tuple[int, int]:
  """(per-token, per-sequence) matmul weights of a model, from its kernels.

  Per token: every kernel of the encoder layers. Per sequence: the kernels
  that see only [CLS] (pooler, classifier); token-level heads' kernels count
  per token, times `head_fraction` (the share of tokens the head runs on:
  sparse masked-LM prediction decodes only the masked positions; the
  task's `head_fraction(seq_len)`).
  """
  per_token = head = per_sequence = 0
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] != "kernel":
      continue
    size = int(np.prod(value.shape))
    if "layers" in path:
      per_token += size
    elif path[0] != "bert" and not _sequence_level(model):
      head += size
    else:
      per_sequence += size
  # A tied MLM decoder is the embedding table used as a matmul on every token.
  head += getattr(model, "tied_matmul_params", lambda: 0)()
  return per_token + int(round(head * head_fraction)), per_sequence


def _sequence_level(model) -> bool:
  return bool(getattr(model, "uses_pooler", False))


def batch_model_flops(lengths, per_token_params: int, per_sequence_params: int,
                      num_layers: int, hidden: int) -> float:
  """Training FLOPs of sequences of these lengths, each attending to itself.

  sum_i (6 * P_token + 12 * L * H * len_i) * len_i + 6 * P_sequence per row:
  with real lengths this is the model's work (MFU's numerator); with every
  row at the padded width it is what the compiled program computes.
  """
  lengths = np.asarray(lengths, np.float64)
  per_tok = 6.0 * per_token_params + 12.0 * num_layers * hidden * lengths
  return float((per_tok * lengths).sum() + 6.0 * per_sequence_params * len(lengths))


def padded_batch_flops(batch, per_token_params: int, per_sequence_params: int,
                       num_layers: int, hidden: int) -> float:
  """Training FLOPs the compiled step does for a (host) batch, padding included.

  Every row at the padded width (a packed row's tokens attend over all of
  it), the sentence head once per example slot.
  """
  rows, width = batch["attention_mask"].shape
  return (batch_model_flops([width] * rows, per_token_params, 0, num_layers,
                            hidden)
          + 6.0 * per_sequence_params * len(batch["weights"]))


def detect_peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak TFLOP/s of one chip from `device.device_kind`, or None."""
  kind = device_kind.lower()
  if "cpu" in kind:
    return None
  for name, peak in PEAK_TFLOPS:
    if name in kind:
      return peak
  return None


def compiled_flops(jitted, *args, compile: bool = True) -> float:  # pylint: disable=redefined-builtin
  """FLOPs XLA counts for the program of `jitted(*args)`.

  With `compile`, of the optimised executable (a cache hit, hence free, when
  the function already ran on these shapes); without, of the lowered HLO as
  traced (fast: no compilation).
  """
  lowered = jitted.lower(*args)
  cost = (lowered.compile() if compile else lowered).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
    cost = cost[0]
  return float(cost["flops"])


def abstract_step_flops(cfg: BertConfig, batch_size: int, seq_len: int,
                        num_labels: int = 2, opt_config=None,
                        compile: bool = True, config=None, **model_kw) -> dict:  # pylint: disable=redefined-builtin
  """Compiled vs analytic FLOPs of one training step, with no weights.

  The model is built abstractly (`nnx.eval_shape`), so bert-base needs no
  checkpoint; the step is `research.training.steps.make_train_step` over
  the config's task's loss (default: `research/configs/default.py`'s),
  on one device, lowered and compiled for one abstract batch of
  [batch_size, seq_len] (`Task.abstract_batch`; dropout as in `cfg`).
  `compile=False` counts the lowered HLO instead (no compilation).
  `model_kw` goes to `create_model` (e.g. `remat=True`, `dtype="bfloat16"`).

  Returns:
    {"compiled": FLOPs from cost_analysis, "analytic": `batch_model_flops`
    at seq_len for every row, "ratio": compiled / analytic}.
  """
  from research.configs import default  # pylint: disable=import-outside-toplevel
  if config is None:
    config = default.get_config()
    config.num_labels = num_labels
  task = tasks.load(config)
  model = nnx.eval_shape(lambda: create_model(task.HEAD, cfg,
                                              task.num_outputs(), **model_kw))
  per_token, per_seq = matmul_params(model)
  graphdef, params, *frozen = partition.split_model(model)
  frozen = partition.Frozen(*frozen)
  opt_config = opt_config or config.optimizer
  tx = optimizers.build_optimizer(opt_config, 100)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
  parallel = ml_collections.ConfigDict(config.parallelism.to_dict())
  parallel.mesh_shape = (1, 1, 1)
  mesh = parallelism.make_mesh(parallel, jax.devices()[:1])
  sharding, frozen_sharding = (
      parallelism.state_shardings(x, mesh, parallel.logical_axis_rules)
      for x in (state, frozen))
  step = make_train_step(
      tx, task.loss_fn(graphdef), seed=0, mesh=mesh, strategy="jit",
      state_sharding=sharding, frozen_sharding=frozen_sharding,
      transform=task.transform)
  batch = task.abstract_batch(batch_size, seq_len)
  compiled = compiled_flops(step, state, frozen, batch, 0, compile=compile)
  analytic = batch_model_flops([seq_len] * batch_size, per_token, per_seq,
                               cfg.num_hidden_layers, cfg.hidden_size)
  return {"compiled": compiled, "analytic": analytic,
          "ratio": compiled / analytic}
