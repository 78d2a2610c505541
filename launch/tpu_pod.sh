#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker at once.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/ade20k_r50.py gs://bucket/workdir [--config.x=y ...]
#
# Prerequisites: the repo checked out at the same path on every worker
# (`gcloud compute tpus tpu-vm ssh ... --worker=all --command "git clone ..."`), and
# `pip install -e ".[tpu]"` there. jax finds the other workers itself
# (jax.distributed.initialize() with no arguments on TPU); each process reads its own
# shard of the data; checkpoints go to the shared workdir (a gs:// path works).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_DIR=${REPO_DIR:-~/mtaclip_jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO_DIR && TPU_WORKER_HOSTNAMES=\${TPU_WORKER_HOSTNAMES:-} \
  .venv/bin/python -m mtaclip_jax.main --config $CONFIG --workdir $WORKDIR $*"
