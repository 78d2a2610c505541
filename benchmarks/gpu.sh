#!/usr/bin/env bash
# GPU benchmark (issue 8): this project and transformers' Mask2Former at bf16 on one
# GPU: the full step and transformers' in one call (under 9 minutes), the baseline,
# inference and the largest batch in a second (EXTRA=1). docs/BENCHMARKS.md: results.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # env: SIZE=512 BATCH=16 STEPS=5 EXTRA=1
#
# Needs jax with CUDA, flax, optax, orbax, torch and transformers. Wheels in .whl/ (if
# any) are installed to /tmp/site first: the device image lacks ml_collections, grain,
# array_record, portpicker, dm-tree, ftfy, wcwidth and openai-clip (the
# tokenizer's vocabulary) (docs/BENCHMARKS.md says how to fetch them).
# Each part runs in its own process (jax and torch do not share the GPU's memory) under
# a time limit, so one failing part does not lose the others.
set -uo pipefail
out=${1:-${OUT:-/tmp/mtaclip_gpu}}
mkdir -p "$out"
log="$out/gpu_benchmark.txt"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
size=${SIZE:-512} batch=${BATCH:-16} steps=${STEPS:-5}
common=(--size "$size" --bf16 --steps "$steps" --warmup 2)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$log"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax',
  flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__,
  jax.devices())" 2>&1 | tee -a "$log"

part() {  # part SECONDS ARGS...: one benchmark process with a time limit
  local limit=$1; shift
  local prealloc=true
  [[ " $* " == *" hf "* ]] && prealloc=false  # torch needs the GPU memory, not jax
  echo "+ python3 -m benchmarks.train_step $*" | tee -a "$log"
  XLA_PYTHON_CLIENT_PREALLOCATE=$prealloc timeout "$limit" \
    python3 -m benchmarks.train_step "$@" 2>&1 \
    | grep -v -E "^(W|I)[0-9]{4} " | tee -a "$log"
  echo "(exit ${PIPESTATUS[0]})" | tee -a "$log"
}

# The first call on a fresh H200 (session 2) did not finish compiling the full step
# within 220 s, so it gets 420 s; the other parts run when EXTRA=1 (a second call).
if [ -z "${EXTRA:-}" ]; then
  part 420 "${common[@]}" --batch "$batch" --which full --text
  part 80 "${common[@]}" --batch "$batch" --which hf
else
  part 240 "${common[@]}" --batch "$batch" --which baseline
  part 120 "${common[@]}" --inference --which full
  part 30 "${common[@]}" --inference --which hf
  part 200 "${common[@]}" --which "" --max-batch 128
fi
