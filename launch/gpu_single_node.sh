#!/usr/bin/env bash
# Train on all GPUs of one machine: one process drives every local GPU (jax's
# single-controller model); the batch is split over the "data" mesh axis.
#
#   launch/gpu_single_node.sh configs/ade20k_r50.py workdirs/ade20k_r50 [--config.x=y ...]
#
# Use CUDA_VISIBLE_DEVICES to choose GPUs. Install with `pip install -e ".[cuda]"`.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
# Let XLA overlap collectives with compute and keep 90% of GPU memory for arrays.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
exec python -m mtaclip_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
