"""glibc malloc settings that make XLA:CPU training steps faster.

XLA:CPU takes every temporary buffer of a step (the word-embedding gradient
alone is 47 MB for MiniLM) from `malloc` and frees it when the step ends.
glibc serves allocations above 32 MB with a fresh `mmap`, keeps one arena per
thread and gives freed memory back to the kernel, so each step touches
brand-new pages again: about 20 ms of page faults per 47 MB on the 2-core
machine of BENCHMARKS.md, a tenth of a MiniLM step. `retain_freed_memory`
makes glibc serve everything from one heap and keep what is freed there, so
after the first steps every buffer lands on memory that is already mapped.
On the quickstart this is +15-20% examples/s (BENCHMARKS.md).

It must run before JAX starts its backend: XLA's worker threads pick their
arena on their first allocation, and applied later the setting measured no
gain. So `research.train` and `research.bench` call `configure` first thing,
before a device is touched, and `auto` has to guess the backend without
starting it: CPU when no accelerator runtime is installed (no libtpu, no
PJRT plugin) or JAX_PLATFORMS says cpu.

There is no library for this: it is three `mallopt` calls. The costs: the
process's resident memory no longer shrinks below its peak (a training
process reaches it on its first step anyway), and all threads share one
arena (the host work of a CPU run is one thread's numpy batching). On GPU and
TPU hosts the step's buffers live on the device, so `auto` leaves glibc as is.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import logging
import os
import platform

from research.configs.plugins import ConfigError

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

MODES = ("auto", "retain", "default")

_applied = False


def retain_freed_memory() -> bool:
  """Keeps freed memory in the process for reuse (glibc only; idempotent).

  Sets: no `mmap` for large blocks (they come from the heap and go back to
  it), no trimming of the heap top, and one arena (XLA's worker threads
  allocate too; per-thread arenas would be trimmed on their own terms).

  Returns:
    True when the settings are in effect, False where the C library is not
    glibc (macOS, musl): nothing is changed there.
  """
  global _applied
  if _applied:
    return True
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))
  if not ok:
    log.warning("glibc mallopt refused a setting; allocator left as is")
    return False
  _applied = True
  log.info("glibc keeps freed memory for reuse (config.cpu_malloc)")
  return True


def in_effect() -> bool:
  """Whether `retain_freed_memory` has changed this process's allocator."""
  return _applied


def accelerator_runtime_installed() -> bool:
  """Whether JAX could find a TPU or GPU runtime, decided without starting
  a backend: libtpu or a PJRT plugin (jax[cuda12], jax[rocm]) installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return importlib.util.find_spec("jax_plugins") is not None


def configure(mode: str) -> bool:
  """Applies `config.cpu_malloc`; call it before JAX starts its backend.

  Args:
    mode: `auto` (retain when the run will be on the CPU: no accelerator
      runtime installed), `retain` (always) or `default` (leave glibc as is).

  Returns:
    Whether the retaining settings are in effect.
  """
  if mode not in MODES:
    raise ConfigError(f"config.cpu_malloc={mode!r}; valid choices: "
                      f"{', '.join(MODES)}")
  if mode == "retain" or (mode == "auto" and not accelerator_runtime_installed()):
    return retain_freed_memory()
  return False
