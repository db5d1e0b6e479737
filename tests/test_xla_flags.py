"""config.xla_flags: what reaches XLA_FLAGS, and that it is set before JAX starts."""

import os
import subprocess
import sys

from research.training import xla_flags


def test_auto_adds_the_measured_flags_unless_the_user_set_them():
  assert xla_flags.flags_for("auto", "") == "--xla_gpu_enable_triton_gemm=false"
  assert xla_flags.flags_for("auto", "--xla_dump_to=/tmp/d") == (
      "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=false")
  # The user's own value of the same flag wins.
  assert xla_flags.flags_for("auto", "--xla_gpu_enable_triton_gemm=true") == (
      "--xla_gpu_enable_triton_gemm=true")


def test_none_and_explicit_flags():
  assert xla_flags.flags_for("none", "--a=1") == "--a=1"
  assert xla_flags.flags_for("--xla_gpu_autotune_level=2", "") == (
      "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=2")
  # An explicit value of an auto flag replaces auto's.
  assert xla_flags.flags_for("--xla_gpu_enable_triton_gemm=true", "") == (
      "--xla_gpu_enable_triton_gemm=true")


def test_configure_before_the_backend_starts():
  code = ("import os; from research.training import xla_flags; "
          "v = xla_flags.configure('auto'); import jax, jax.numpy as jnp; "
          "assert float(jnp.ones(3).sum()) == 3.0; print(os.environ['XLA_FLAGS'])")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "--xla_gpu_enable_triton_gemm=false"
