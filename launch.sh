#!/usr/bin/env bash
# Starts an experiment here, on every worker of a Cloud TPU VM, or as one
# process of a multi-process GPU run; or builds the Python environment.
#
#   ./launch.sh local CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]
#   ./launch.sh tpu --name NAME --zone ZONE [--project P] [--create
#       --accelerator-type v4-8 [--version tpu-ubuntu2204-base]]
#       [--python 3.12] CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]
#   ./launch.sh gpu --coordinator HOST:PORT --num-processes N --process-id I
#       [--python 3.12] [--extras cuda,tfds,hf] CONFIG [--workdir DIR] [...]
#   ./launch.sh setup [--python 3.12] [--extras tpu,tfds,hf]
#
# Any mode takes --dry-run: print every command, run none.
# CONFIG is experiments/<name>.py[:arg]; the workdir defaults to
# workdirs/<name>, and rerunning the same command resumes the run. On a
# multi-host TPU slice give a shared --workdir (gs://bucket/dir): every worker
# writes its shards of each checkpoint there.
#
# tpu, gpu and setup run in ~/.venvs/research-bert, a venv of Python
# --python (>= 3.11; default 3.12) made by uv (installed with pip --user if
# missing; uv fetches that Python, so the image's own Python does not matter)
# with the package and --extras installed. It is kept between launches and
# rebuilt only when setup.py, --python or --extras change.
#
# Secrets (WANDB_API_KEY) are read from the environment only. For tpu they are
# copied to the workers in a mode-600 file, never put on a command line, so
# they appear in no printed command, process list or log.
set -euo pipefail

usage() {
  echo "usage:" >&2
  sed -n '5,14p' "$0" | sed 's/^# \{0,1\}/  /' >&2
  exit 2
}
die() { echo "launch.sh: $*" >&2; usage; }

# Prints a command with shell quoting; runs it unless --dry-run.
dry_run=0
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run == 0 ]]; then "$@"; fi
}
# The same for one shell line, printed as it is.
run_line() {
  printf '+ %s\n' "$1"
  if [[ $dry_run == 0 ]]; then bash -c "$1"; fi
}

[[ $# -ge 1 ]] || usage
mode=$1; shift
case $mode in local|tpu|gpu|setup) ;; -h|--help) usage ;; *) die "unknown mode '$mode'; valid: local, tpu, gpu, setup" ;; esac

name="" zone="" project="" create=0 accelerator="" version="tpu-ubuntu2204-base"
coordinator="" num_processes="" process_id="" config="" workdir=""
python=3.12 extras=""
overrides=()
need() { [[ $2 -ge 2 && -n ${3:-} && ${3:0:2} != -- ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --name) need "$1" $# "${2:-}"; name=$2; shift 2 ;;
    --zone) need "$1" $# "${2:-}"; zone=$2; shift 2 ;;
    --project) need "$1" $# "${2:-}"; project=$2; shift 2 ;;
    --create) create=1; shift ;;
    --accelerator-type) need "$1" $# "${2:-}"; accelerator=$2; shift 2 ;;
    --version) need "$1" $# "${2:-}"; version=$2; shift 2 ;;
    --coordinator) need "$1" $# "${2:-}"; coordinator=$2; shift 2 ;;
    --num-processes) need "$1" $# "${2:-}"; num_processes=$2; shift 2 ;;
    --process-id) need "$1" $# "${2:-}"; process_id=$2; shift 2 ;;
    --python) need "$1" $# "${2:-}"; python=$2; shift 2 ;;
    --extras) need "$1" $# "${2:-}"; extras=$2; shift 2 ;;
    --workdir) need "$1" $# "${2:-}"; workdir=$2; shift 2 ;;
    --workdir=*) workdir=${1#--workdir=}; shift ;;
    --config.*) overrides+=("$1"); shift ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z $config ]] || die "one CONFIG only (got '$config' and '$1')"; config=$1; shift ;;
  esac
done

[[ $python =~ ^3\.(1[1-9]|[2-9][0-9])$ ]] ||
  die "--python must be 3.11 or newer (jax >= 0.7 needs it), got '$python'"
[[ $extras =~ ^[a-z0-9,]*$ ]] || die "--extras is a comma-separated list, got '$extras'"
case $mode in
  tpu|setup) extras=${extras:-tpu,tfds,hf} ;;
  gpu) extras=${extras:-cuda,tfds,hf} ;;
esac
cd "$(dirname "$0")"

# The environment that tpu, gpu and setup run in, as one shell line (run here
# or sent to the workers). The stamp holds what it was built from.
venv='$HOME/.venvs/research-bert'
env_setup="set -e; venv=$venv"
env_setup+="; want=\"\$(sha256sum setup.py | cut -c1-16) python$python [$extras]\""
env_setup+="; if [ \"\$(cat \$venv/.stamp 2>/dev/null)\" != \"\$want\" ]; then"
env_setup+=" export PATH=\$HOME/.local/bin:\$PATH"
env_setup+="; command -v uv >/dev/null || python3 -m pip install -q --user uv"
env_setup+=" || python3 -m pip install -q --user --break-system-packages uv"
env_setup+="; rm -rf \$venv; uv venv -q --python $python \$venv"
env_setup+="; uv pip install -q --python \$venv/bin/python -e '.[$extras]'"
env_setup+="; echo \"\$want\" > \$venv/.stamp; fi"
venv_python="$venv/bin/python"

if [[ $mode == setup ]]; then
  [[ -z $config ]] || die "setup takes no CONFIG (got '$config')"
  run_line "$env_setup"
  exit 0
fi

[[ -n $config ]] || die "missing CONFIG (experiments/<name>.py[:arg])"
[[ -f ${config%%:*} ]] || die "config file '${config%%:*}' not found"
workdir=${workdir:-workdirs/$(basename "${config%%:*}" .py)}
train=(-m research.train --config "$config" --workdir "$workdir")
train+=(${overrides[@]+"${overrides[@]}"})

case $mode in
  local)
    run python3 "${train[@]}"
    ;;

  gpu)
    [[ -n $coordinator && -n $num_processes && -n $process_id ]] ||
      die "gpu needs --coordinator HOST:PORT --num-processes N --process-id I"
    [[ $num_processes =~ ^[1-9][0-9]*$ && $process_id =~ ^[0-9]+$ &&
       $process_id -lt $num_processes ]] ||
      die "--process-id must be in [0, --num-processes)"
    run_line "$env_setup"
    # research.parallelism.initialize_distributed reads these.
    run env JAX_COORDINATOR_ADDRESS="$coordinator" \
      JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$process_id" \
      "${venv_python/\$HOME/$HOME}" "${train[@]}"
    ;;

  tpu)
    [[ -n $name && -n $zone ]] || die "tpu needs --name NAME and --zone ZONE"
    [[ $create == 0 || -n $accelerator ]] || die "--create needs --accelerator-type (e.g. v4-8)"
    where=(--zone "$zone"); [[ -z $project ]] || where+=(--project "$project")
    if [[ $create == 1 ]]; then
      run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
        --accelerator-type "$accelerator" --version "$version"
    fi
    # The code as it is here (committed or not), without runs and caches.
    archive=$(mktemp -d)/research-bert.tar.gz
    run tar czf "$archive" --exclude=./.git --exclude=./workdirs \
      --exclude='*/__pycache__' .
    run gcloud compute tpus tpu-vm scp "$archive" "$name:research-bert.tar.gz" \
      "${where[@]}" --worker=all
    env_file=$(mktemp)
    chmod 600 "$env_file"
    if [[ -n ${WANDB_API_KEY:-} && $dry_run == 0 ]]; then
      printf 'export WANDB_API_KEY=%q\n' "$WANDB_API_KEY" > "$env_file"
    fi
    run gcloud compute tpus tpu-vm scp "$env_file" "$name:.research-env" \
      "${where[@]}" --worker=all
    rm -f "$env_file"
    remote="set -e; chmod 600 ~/.research-env; mkdir -p ~/research-bert"
    remote+="; tar xzf ~/research-bert.tar.gz -C ~/research-bert; cd ~/research-bert"
    remote+="; $env_setup"
    remote+="; . ~/.research-env; $venv_python $(printf '%q ' "${train[@]}")"
    printf '# on every worker: %s\n' "$remote"
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
      --command "$remote"
    ;;
esac
