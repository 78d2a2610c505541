#!/usr/bin/env bash
# One process of a multi-node GPU run: start it once on every node (each drives that
# node's GPUs). Under SLURM, `srun` starts it (launch/gpu_slurm.sbatch does); without
# SLURM, start it yourself on each node (ssh, a cluster tool) with the three JAX_*
# variables set:
#
#   JAX_COORDINATOR_ADDRESS=node0:12355 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=I \
#     launch/gpu_multinode.sh configs/ade20k_r50.py /shared/workdir [--config.x=y ...]
#
# Reads: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES,
# JAX_PROCESS_ID; when those are unset, SLURM's SLURM_PROCID, SLURM_NTASKS and
# SLURM_JOB_NODELIST (process 0 runs on the list's first node; port MTACLIP_PORT,
# default 12355); XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90), PYTHON
# (launch/common.sh). WORKDIR must be a folder every node sees (NFS, GCS).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CONFIG=$1
WORKDIR=$2
shift 2
if [ -z "${JAX_PROCESS_ID:-}" ] && [ -n "${SLURM_PROCID:-}" ]; then
  export JAX_PROCESS_ID=$SLURM_PROCID
  export JAX_NUM_PROCESSES=${JAX_NUM_PROCESSES:-$SLURM_NTASKS}
  if [ -z "${JAX_COORDINATOR_ADDRESS:-}" ]; then
    # sed reads every line: `head -n 1` would close the pipe early, and under pipefail
    # scontrol's SIGPIPE (status 141) would end the script.
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
    export JAX_COORDINATOR_ADDRESS=$first:${MTACLIP_PORT:-12355}
  fi
fi
for name in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID; do
  if [ -z "${!name:-}" ]; then
    echo "error: $name is not set (set the three JAX_* variables, or start this under srun)" >&2
    exit 2
  fi
done
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
cmd=("$(mtaclip_python)" -m mtaclip_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@")
exec "${cmd[@]}"
