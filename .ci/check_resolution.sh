#!/usr/bin/env bash
# What pip resolves for this package on a fresh Linux x86-64 machine, per
# Python version: the documented check behind setup.py's ranges (README:
# "Tested versions"). It needs the package index, so it is not a unit test.
#
#   .ci/check_resolution.sh            # Python 3.11 and 3.12, extras tpu and cuda
#
# Prints the versions picked for the main packages and fails if Python 3.11
# does not get jax 0.10 or Python 3.12 does not get jax >= 0.11 with a flax
# that supports it (>= 0.12.9), or if a Python 3.12 machine that already has
# jax[tpu] 0.11.2 would have it changed. pip >= 24 is used, from a throwaway
# venv: older pips (23.2 here) check Requires-Python against the running
# interpreter rather than --python-version and so resolve 3.12 like 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade "pip>=24"
"${pip[@]}" wheel -q --no-deps . -w "$tmp/wheel"
rm -rf build research_bert.egg-info
wheel=$(ls "$tmp"/wheel/research_bert-*.whl)
# Wheels for glibc 2.17-2.35 (a Cloud TPU VM's Ubuntu 22.04 has 2.35).
platforms=(--platform manylinux2014_x86_64)
for n in $(seq 17 35); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done

resolve() {  # PYTHON REQUIREMENT... -> report JSON path
  local py=$1 report="$tmp/report-$RANDOM.json"; shift
  "${pip[@]}" install -q --dry-run --ignore-installed --target "$tmp/target" \
    --report "$report" --python-version "$py" --implementation cp \
    "${platforms[@]}" --only-binary=:all: "$@" >&2
  echo "$report"
}

check() {  # PYTHON EXTRA [PIN]: prints the picks, checks the jax rule
  local py=$1 extra=$2 pin=${3:-}
  local report
  report=$(resolve "$py" "$wheel[$extra]" ${pin:+"$pin"})
  python3 - "$report" "$py" "$extra" "$pin" <<'PY'
import json, sys
report, py, extra, pin = sys.argv[1:]
picked = {i["metadata"]["name"].lower().replace("_", "-"):
          i["metadata"]["version"] for i in json.load(open(report))["install"]}
names = ["jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax", "optax",
         "orbax-checkpoint", "etils", "transformers", "wandb", "numpy"]
print(f"Python {py} .[{extra}]{' + ' + pin if pin else ''}: " + ", ".join(
    f"{n} {picked[n]}" for n in names if n in picked))
version = lambda n: tuple(int(x) for x in picked[n].split(".")[:3])
if py == "3.11":
  assert version("jax")[:2] == (0, 10), picked["jax"]
else:
  assert version("jax") >= (0, 11), f"Python {py} got jax {picked['jax']}"
  assert version("flax") >= (0, 12, 9), f"flax {picked['flax']}"
if pin:
  name, want = pin.split("==")
  assert picked[name.split("[")[0]] == want, f"{pin} changed: {picked}"
PY
}

for py in 3.11 3.12; do
  for extra in tpu cuda; do check "$py" "$extra"; done
done
check 3.12 tpu "jax[tpu]==0.11.2"
