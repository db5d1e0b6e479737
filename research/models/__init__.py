"""Models: the BERT encoder, task heads, and Hugging Face checkpoint I/O."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from research.models import heads
from research.models import pooling as pooling_lib
from research.models.bert import BertConfig, BertModel, DenseFactory, make_dense, stack_attention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def head_class(task) -> type[nnx.Module]:
  """The head class for a task, by naming convention (`masked_lm` -> `MaskedLM`).

  Args:
    task: a name from `heads.TASKS`, or a head class (returned as it is), so
      that a head defined outside `research.models.heads` plugs in.
  """
  if isinstance(task, type):
    if not issubclass(task, nnx.Module):
      raise TypeError(f"a head class must be an nnx.Module; got {task.__name__}")
    return task
  if task not in heads.TASKS:
    raise ValueError(f"config.task={task!r} is not a known task; valid: "
                     f"{', '.join(heads.TASKS)}")
  name = "".join(w.upper() if w == "lm" else w.capitalize()
                 for w in task.split("_"))
  return getattr(heads, name)


def create_model(task, cfg: BertConfig, num_labels: int = 2, *,
                 dtype="float32", param_dtype="float32", attention_impl=None,
                 remat=False, scan_layers=False,
                 dense_factory: DenseFactory | None = make_dense,
                 pooling: str = "pooler", seed: int = 0) -> nnx.Module:
  """Builds a randomly initialised model with the head for `task`.

  Args:
    task: one of `heads.TASKS`, or a head class.
    cfg: the encoder architecture.
    num_labels: classes (1 = regression) for the classification heads.
    dtype: compute dtype name ("float32", "bfloat16").
    param_dtype: parameter dtype name (keep "float32" for master weights).
    attention_impl: `jax.nn.dot_product_attention` implementation.
    remat: rematerialise each layer in the backward pass.
    scan_layers: run the layers as one scan (`BertModel.encode`).
    dense_factory: builds every dense layer (None or
      `research.models.bert.make_dense`: the default; LoRA or quantised
      layers pass their own).
    pooling: how a sentence-level head pools (`research.models.pooling`);
      "auto" is "pooler" here (no checkpoint to ask).
    seed: initialisation seed.
  """
  for field, value in (("dtype", dtype), ("param_dtype", param_dtype)):
    if value not in DTYPES:
      raise ValueError(f"config.model.{field}={value!r}; valid: {', '.join(DTYPES)}")
  return head_class(task)(cfg, num_labels, dtype=DTYPES[dtype],
                          param_dtype=DTYPES[param_dtype],
                          attention_impl=attention_impl, remat=remat,
                          scan_layers=scan_layers,
                          pooling=pooling_lib.resolve(pooling),
                          dense_factory=dense_factory or make_dense,
                          rngs=nnx.Rngs(params=seed))
