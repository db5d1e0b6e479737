"""Tests for research.training.host_memory (glibc settings of CPU runs)."""

import platform
import subprocess
import sys

import pytest

from research.training import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_bad_mode_names_the_field_and_choices():
  with pytest.raises(ValueError, match=r"config\.cpu_malloc='always'.*auto, "
                     r"retain, default"):
    host_memory.configure("always")


@pytest.mark.parametrize("platforms,expected", [
    ("cpu", False), ("cuda", True), ("tpu,cpu", True), ("cpu,cuda", False)])
def test_jax_platforms_decides_the_backend(monkeypatch, platforms, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host_memory.accelerator_runtime_installed() is expected


def _thp_always():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


def _in_fresh_process(code, **env):
  import os  # pylint: disable=import-outside-toplevel
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=60, check=True,
                       env=dict(os.environ, **env))
  return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_modes_in_a_fresh_process():
  code = ("from research.training import host_memory as h; import sys; "
          "print(h.configure(sys.argv[1]), h.in_effect())")
  for mode, platforms, expected in (("default", "cpu", ["False", "False"]),
                                    ("auto", "cuda", ["False", "False"]),
                                    ("auto", "cpu", ["True", "True"]),
                                    ("retain", "cuda", ["True", "True"])):
    got = _in_fresh_process(code.replace("sys.argv[1]", repr(mode)),
                            JAX_PLATFORMS=platforms)
    assert got == expected, (mode, platforms, got)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_large_block_is_reused_without_new_page_faults():
  """What the setting is for: a freed 64 MB block comes back already mapped,
  where glibc's default (mmap/munmap) faults every page in again."""
  code = """
import ctypes, resource, sys
from research.training import host_memory
if sys.argv[1] == "retain":
  host_memory.retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""
  pages = (64 << 20) // 4096
  default = [int(x) for x in _in_fresh_process(code.replace("sys.argv[1]", "'default'"))]
  retain = [int(x) for x in _in_fresh_process(code.replace("sys.argv[1]", "'retain'"))]
  # Default: mmap/munmap, so every round faults the block in again: all 16384
  # pages, or 32 huge pages where transparent huge pages are always on.
  assert min(default) >= (32 if _thp_always() else 0.9 * pages), default
  # Retain: the first round maps the block, later rounds reuse it.
  assert retain[0] > 0.9 * pages and max(retain[1:]) < 0.01 * pages, retain
