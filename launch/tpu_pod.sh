#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker at once, one
# process per worker; jax finds the other workers itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/ade20k_r50.py gs://bucket/workdir [--config.x=y ...]
#
# Run it from the checkout on the first worker (or any machine with gcloud): on every
# worker the command runs in the same folder as here (REMOTE_DIR, default: the current
# folder), so relative paths mean what they mean here; the checkout must be at the
# same path on every worker (`gcloud compute tpus tpu-vm ssh ... --worker=all
# --command "git clone ..."`), installed with `pip install -e ".[tpu]"`. WORKDIR must
# be shared by the workers (a gs:// path works).
#
# Reads: REMOTE_DIR; REPO_DIR (the checkout on the workers, default this one's path);
# PYTHON (the interpreter on the workers; default REPO_DIR/.venv/bin/python if it is
# there, else python3, as launch/common.sh chooses). Arguments reach the workers
# quoted, so overrides with spaces or parentheses arrive as typed.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TPU_NAME=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4
REMOTE_DIR=${REMOTE_DIR:-$PWD}
REPO_DIR=${REPO_DIR:-$MTACLIP_REPO}
repo=$(printf %q "$REPO_DIR")
if [ -n "${PYTHON:-}" ]; then
  choose="py=$(printf %q "$PYTHON")"
else
  choose="py=$repo/.venv/bin/python; [ -x \"\$py\" ] || py=python3"
fi
args="--config $(printf %q "$CONFIG") --workdir $(printf %q "$WORKDIR")"
for arg in "$@"; do
  args+=" $(printf %q "$arg")"
done
remote="cd $(printf %q "$REMOTE_DIR") && export PYTHONPATH=$repo\${PYTHONPATH:+:\$PYTHONPATH} && $choose && exec \"\$py\" -m mtaclip_jax.main $args"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote"
