#!/usr/bin/env bash
# N processes of one run on this machine, as N hosts would run it: for CPU clusters'
# single nodes, tests and debugging multi-host code paths without a cluster.
#
#   launch/local_multiprocess.sh 2 configs/demo.py workdirs/demo2 [--config.x=y ...] [--mode=eval]
#
# Process 0's lines come as they are, the others' prefixed "[process I] "; each line is
# written whole, so lines of two processes never run together.
# SIGTERM to this script goes to every process (they save the same step and exit 0).
# When a process fails, the others get GRACE seconds to stop with it, then SIGKILL;
# the exit status is the first failure's (0 when all succeed).
#
# Reads: DEVICES_PER_PROCESS (CPU: how many devices each process gets, through
# XLA_FLAGS=--xla_force_host_platform_device_count; default: jax's own, 1 on CPU),
# MTACLIP_PORT (the coordinator's port on localhost; default: a free one),
# GRACE (default 10), PYTHON (launch/common.sh). The processes talk through
# jax.distributed (gloo collectives on CPU).
set -euo pipefail
if [ $# -lt 3 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
N=$1
CONFIG=$2
WORKDIR=$3
shift 3
PY=$(mtaclip_python)
PORT=${MTACLIP_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
if [ -n "${DEVICES_PER_PROCESS:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
fi
GRACE=${GRACE:-10}
# Their output goes through pipes: unbuffered, so lines arrive as they are printed.
export PYTHONUNBUFFERED=1

# Each line whole, in one write. A process's own writes can't be trusted to be whole
# lines (`print` under PYTHONUNBUFFERED writes the text and its newline apart; so does
# `sed -u`), so every process, the first included, writes through this loop.
prefix() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do printf '%s%s\n' "$1" "$line"; done
}

pids=()
for ((i = 0; i < N; i++)); do
  cmd=("$PY" -m mtaclip_jax.main --config "$CONFIG" --workdir "$WORKDIR"
    --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i" "$@")
  tag="[process $i] "
  ((i > 0)) || tag=""
  "${cmd[@]}" > >(prefix "$tag") 2> >(prefix "$tag" >&2) &
  pids+=($!)
done
forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM

status=0
first_failure=""
left=$N
while ((left > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [ "$pid" = done ] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[$i]=done
    left=$((left - 1))
    if ((rc != 0)) && [ -z "$first_failure" ]; then
      status=$rc
      first_failure=$(date +%s)
      echo "launch: process $i exited with status $rc; stopping the others" >&2
    fi
  done
  if [ -n "$first_failure" ] && (($(date +%s) - first_failure >= GRACE)); then
    for pid in "${pids[@]}"; do
      [ "$pid" = done ] || kill -KILL "$pid" 2>/dev/null || true
    done
  fi
  sleep 0.2
done
exit "$status"
