#!/usr/bin/env bash
# Starts an experiment here, on every worker of a Cloud TPU VM, or as one
# process of a multi-process GPU run.
#
#   ./launch.sh local CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]
#   ./launch.sh tpu --name NAME --zone ZONE [--project P] [--create
#       --accelerator-type v4-8 [--version tpu-ubuntu2204-base]]
#       CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]
#   ./launch.sh gpu --coordinator HOST:PORT --num-processes N --process-id I
#       CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]
#
# Any mode takes --dry-run: print every command, run none.
# CONFIG is experiments/<name>.py[:arg]; the workdir defaults to
# workdirs/<name>, and rerunning the same command resumes the run. On a
# multi-host TPU slice give a shared --workdir (gs://bucket/dir): every worker
# writes its shards of each checkpoint there.
#
# Secrets (WANDB_API_KEY) are read from the environment only. For tpu they are
# copied to the workers in a mode-600 file, never put on a command line, so
# they appear in no printed command, process list or log.
set -euo pipefail

usage() {
  echo "usage:" >&2
  sed -n '5,12p' "$0" | sed 's/^# \{0,1\}/  /' >&2
  exit 2
}
die() { echo "launch.sh: $*" >&2; usage; }

# Prints a command with shell quoting; runs it unless --dry-run.
dry_run=0
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run == 0 ]]; then "$@"; fi
}

[[ $# -ge 1 ]] || usage
mode=$1; shift
case $mode in local|tpu|gpu) ;; -h|--help) usage ;; *) die "unknown mode '$mode'; valid: local, tpu, gpu" ;; esac

name="" zone="" project="" create=0 accelerator="" version="tpu-ubuntu2204-base"
coordinator="" num_processes="" process_id="" config="" workdir=""
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
    --workdir) need "$1" $# "${2:-}"; workdir=$2; shift 2 ;;
    --workdir=*) workdir=${1#--workdir=}; shift ;;
    --config.*) overrides+=("$1"); shift ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z $config ]] || die "one CONFIG only (got '$config' and '$1')"; config=$1; shift ;;
  esac
done

[[ -n $config ]] || die "missing CONFIG (experiments/<name>.py[:arg])"
cd "$(dirname "$0")"
[[ -f ${config%%:*} ]] || die "config file '${config%%:*}' not found"
workdir=${workdir:-workdirs/$(basename "${config%%:*}" .py)}
train=(python3 -m research.train --config "$config" --workdir "$workdir")
train+=(${overrides[@]+"${overrides[@]}"})

case $mode in
  local)
    run "${train[@]}"
    ;;

  gpu)
    [[ -n $coordinator && -n $num_processes && -n $process_id ]] ||
      die "gpu needs --coordinator HOST:PORT --num-processes N --process-id I"
    [[ $num_processes =~ ^[1-9][0-9]*$ && $process_id =~ ^[0-9]+$ &&
       $process_id -lt $num_processes ]] ||
      die "--process-id must be in [0, --num-processes)"
    # research.parallelism.initialize_distributed reads these.
    run env JAX_COORDINATOR_ADDRESS="$coordinator" \
      JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$process_id" \
      "${train[@]}"
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
    remote+="; python3 -m pip install -q -e '.[tpu,tfds,hf]'"
    remote+="; . ~/.research-env; $(printf '%q ' "${train[@]}")"
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
      --command "$remote"
    ;;
esac
