"""XLA flags a run sets before JAX starts its backend (`config.xla_flags`).

XLA reads `XLA_FLAGS` once, when the backend starts, so `research.train` and
`research.bench` call `configure` first thing, like `host_memory.configure`.

`auto` adds the flags measured to help on accelerators (BENCHMARKS.md, "GPU:
one NVIDIA H200"), each only where the user's `XLA_FLAGS` does not already set
it; flags for a backend that is not in use are read and ignored:

- `--xla_gpu_enable_triton_gemm=false`: every matrix product goes to cuBLAS
  instead of autotuned Triton kernels. On an H200 the bert-base step
  compiled in 20 s instead of 41 s and ran ~7% faster.

`none` leaves `XLA_FLAGS` as it is; any other value is a string of flags
added as given (after `auto`'s, so they win).
"""

import logging
import os

log = logging.getLogger(__name__)

AUTO_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def flags_for(mode: str, existing: str = "") -> str:
  """The `XLA_FLAGS` value `configure(mode)` would set over `existing`."""
  if mode == "none":
    return existing
  given = set(f.split("=")[0] for f in existing.split())
  added = [f for f in AUTO_FLAGS if f.split("=")[0] not in given]
  if mode != "auto":
    added = [f for f in added if f.split("=")[0] not in mode] + mode.split()
  return " ".join(existing.split() + added)


def configure(mode: str) -> str:
  """Sets `XLA_FLAGS` for `mode` ("auto", "none" or flags); returns it.

  Must run before JAX starts a backend (the first device query or
  computation): a backend already started has read its flags, and the
  function then only warns.
  """
  value = flags_for(mode, os.environ.get("XLA_FLAGS", ""))
  if value == os.environ.get("XLA_FLAGS", ""):
    return value
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    log.warning("config.xla_flags=%r: JAX's backend already started; "
                "XLA_FLAGS left as %r", mode, os.environ.get("XLA_FLAGS", ""))
    return os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = value
  return value
