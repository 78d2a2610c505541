#!/usr/bin/env bash
# Train on all GPUs of one machine: one process drives every local GPU (jax's
# single-controller model); the batch is split over the "data" mesh axis.
#
#   launch/gpu_single_node.sh configs/ade20k_r50.py workdirs/ade20k_r50 [--config.x=y ...]
#
# Reads: CUDA_VISIBLE_DEVICES (which GPUs), XLA_PYTHON_CLIENT_MEM_FRACTION (default
# 0.90: the share of GPU memory jax reserves for arrays), PYTHON (launch/common.sh).
# Install with `pip install -e ".[cuda]"`. Also runs on a CPU-only machine.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CONFIG=$1
WORKDIR=$2
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
cmd=("$(mtaclip_python)" -m mtaclip_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@")
exec "${cmd[@]}"
