#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/gpu_check.py; BENCHMARKS.md says what
# it measures). Usage: benchmarks/gpu_check.sh OUT_DIR [gpu_check.py flags]
#
# The GPU machine has jax, flax, optax, orbax, transformers, torch and
# accelerate but no ml_collections, and reaches no package index: wheels in
# the git-ignored .whl/ (fetched beforehand with the `pip download` line in
# BENCHMARKS.md) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [flags]}"
shift
mkdir -p "$out"
if ! python3 -c "import ml_collections" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "error: ml_collections is missing and there is no .whl/ to install it from" >&2
    exit 2
  fi
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv > "$out/nvidia_smi.txt" 2>&1 || true
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 WANDB_MODE=disabled
python3 benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
