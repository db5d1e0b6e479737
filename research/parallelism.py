"""Device mesh, sharding rules and multi-host setup, all from `config.parallelism`.

Two strategies run the same training step on many devices:

- `jit` (the pjit style): one program over a `(data, fsdp, tensor)` mesh.
  Parameters and optimiser state are sharded by their logical axis names
  (`models/bert.py`) through `config.parallelism.logical_axis_rules`; XLA's
  SPMD partitioner inserts the collectives. Data parallel, FSDP and tensor
  parallel are different mesh shapes of the same code.
- `pmap` (the per-device style): each device runs the step on its slice of
  the batch with replicated parameters, and gradients are all-reduced
  explicitly with `psum`. Written with `jax.shard_map`, which JAX recommends
  over `jax.pmap`: it takes the same `Mesh` and `NamedSharding`s as the jit
  path (one checkpoint and input format for both) and composes with `jit`.

Models never name mesh axes: mesh shape and rules live in config only.
"""

from __future__ import annotations

import collections
import logging
import os

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over every axis that holds data replicas.
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("jit", "pmap")


class ParallelismError(ValueError):
  """A mesh or batch layout that cannot work on these devices."""


def initialize_distributed(mode: str = "auto") -> None:
  """Starts `jax.distributed` when running as one of several processes.

  `auto` initialises when the environment says there are several processes:
  the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables
  (set by `launch.sh gpu`), or a multi-worker Cloud TPU slice
  (TPU_WORKER_HOSTNAMES lists more than one host), where JAX finds the
  coordinator itself.
  """
  if mode not in ("auto", "on", "off"):
    raise ParallelismError(f"config.parallelism.distributed={mode!r}; valid: "
                           "auto, on, off")
  if mode == "off":
    return
  env = os.environ
  multi_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
  explicit = "JAX_COORDINATOR_ADDRESS" in env
  if mode == "on" or explicit or multi_tpu:
    kwargs = {}
    if explicit:
      kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                    num_processes=int(env["JAX_NUM_PROCESSES"]),
                    process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def make_mesh(parallelism, devices=None) -> jax.sharding.Mesh:
  """Builds the `(data, fsdp, tensor)` mesh; one -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(parallelism.mesh_shape)
  field = "config.parallelism.mesh_shape"
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(
      s == 0 or s < -1 for s in shape):
    raise ParallelismError(
        f"{field}={tuple(shape)}: give sizes for {MESH_AXES}, positive or one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ParallelismError(f"{field}={tuple(shape)} does not divide the "
                             f"{len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) > len(devices):
    raise ParallelismError(f"{field}={tuple(shape)} needs {int(np.prod(shape))} "
                           f"devices; there are {len(devices)}")
  if int(np.prod(shape)) < len(devices):
    if jax.process_count() > 1:
      raise ParallelismError(f"{field}={tuple(shape)} must use all "
                             f"{len(devices)} devices of a multi-host run")
    log.warning("%s=%s uses %d of the %d devices", field, tuple(shape),
                int(np.prod(shape)), len(devices))
    devices = devices[:int(np.prod(shape))]
  if parallelism.strategy == "pmap" and shape[1:] != [1, 1]:
    raise ParallelismError(
        f"config.parallelism.strategy='pmap' replicates parameters: "
        f"{field}={tuple(parallelism.mesh_shape)} must have fsdp = tensor = 1; "
        "use strategy='jit' for sharded parameters")
  # Auto axes: XLA propagates shardings from the ones we give (GSPMD), as
  # pjit did; Explicit axes would make every op state its output sharding.
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh, field: str) -> None:
  """Fails before compiling if the batch cannot be split over the mesh."""
  n = data_parallel_size(mesh)
  if batch_size % n:
    raise ParallelismError(
        f"{field}={batch_size} is not divisible by the data-parallel size {n} "
        f"(mesh {dict(mesh.shape)}: data x fsdp)")


def batch_sharding(mesh) -> NamedSharding:
  """Batch dimension split over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh, rules, strategy: str = "jit"):
  """Per-leaf `NamedSharding`s for a state of nnx Variables (params, opt state).

  Args:
    abstract_state: a pytree holding `nnx.State`s (e.g. from `jax.eval_shape`);
      each Variable's `out_sharding` metadata gives its logical axis names,
      and optax moments copy their parameter's Variable, hence its names.
    mesh: the device mesh.
    rules: `config.parallelism.logical_axis_rules`, (logical, mesh axes) pairs.
    strategy: "pmap" replicates everything.
  """
  if strategy == "pmap":
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  logical = nnx.get_partition_spec(abstract_state)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, [tuple(r) for r in rules])
  return jax.tree.map(_divisible, abstract_state, shardings)


def _divisible(leaf, sharding):
  """Replicates dimensions the mesh does not divide (BERT's vocab, 30522 =
  2 x 3 x 5087, cannot be split 4 ways); the rest stays sharded."""
  spec = list(sharding.spec) + [None] * (leaf.ndim - len(sharding.spec))
  for dim, axes in enumerate(spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([sharding.mesh.shape[a] for a in names]))
    if leaf.shape[dim] % ways:
      log.info("dimension %d (size %d) of a %s weight is not divisible by %s: "
               "replicated", dim, leaf.shape[dim], leaf.shape, names)
      spec[dim] = None
  return NamedSharding(sharding.mesh, P(*spec))


def shard_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host numpy batch (this process's rows) -> one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def prefetch(batches, sharding, size: int = 2):
  """Puts up to `size` batches on the devices ahead of the step using them.

  Transfers are asynchronous: while the step on batch t runs, batch t + 1 is
  already being copied, so the accelerator does not wait for the host.

  Yields:
    (host_batch, device_batch): the numpy batch (for host-side counts) and
    its global sharded arrays.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append((batch, shard_batch(batch, sharding)))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def sharding_table(shardings) -> list[tuple[str, str]]:
  """(path, PartitionSpec) rows for review, e.g. in a golden test."""
  rows = []
  for path, s in jax.tree_util.tree_leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    # Skip the `.value` attribute of nnx Variable boxes; keep dict keys.
    name = "/".join(
        str(getattr(k, "key", getattr(k, "idx", k))) for k in path
        if not isinstance(k, jax.tree_util.GetAttrKey))
    rows.append((name, str(tuple(s.spec))))
  return rows
