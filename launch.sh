#!/usr/bin/env bash
# Starts an experiment.
#
#   ./launch.sh local CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]
#
# local: runs `python -m research.train` on this machine. CONFIG is
# experiments/<name>.py[:arg]; without --workdir the run goes to
# workdirs/<name>. Rerunning the same command resumes the run.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: launch.sh local CONFIG [--workdir DIR] [--config.FIELD=VALUE ...]
  CONFIG    experiments/<name>.py[:arg]
  --workdir run directory (default: workdirs/<name>); an existing one resumes
USAGE
  exit 2
}

[[ $# -ge 2 ]] || usage
mode=$1; config=$2; shift 2
[[ -f ${config%%:*} ]] || { echo "launch.sh: config file '${config%%:*}' not found" >&2; usage; }

workdir=""
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --workdir) [[ $# -ge 2 ]] || usage; workdir=$2; shift 2 ;;
    --workdir=*) workdir=${1#--workdir=}; shift ;;
    --config.*) args+=("$1"); shift ;;
    *) echo "launch.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
name=$(basename "${config%%:*}" .py)
workdir=${workdir:-workdirs/$name}

case $mode in
  local)
    exec python3 -m research.train --config "$config" --workdir "$workdir" "${args[@]}"
    ;;
  *)
    echo "launch.sh: unknown mode '$mode'; valid: local" >&2
    usage
    ;;
esac
