#!/usr/bin/env bash
# GPU benchmark (issue 8): this project and transformers' Mask2Former at bf16 on one
# GPU, in one call of under 9 minutes. docs/BENCHMARKS.md: results.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # env: SIZE=512 BATCH=16 STEPS=5 LIMIT=400
#
# Needs jax with CUDA, flax, optax, orbax, torch and transformers. Wheels in .whl/ (if
# any) are installed to /tmp/site first: the device image lacks ml_collections, grain,
# array_record, portpicker, dm-tree, ftfy, wcwidth and openai-clip (the
# tokenizer's vocabulary) (docs/BENCHMARKS.md says how to fetch them).
# Each part runs in its own process under a time limit, so one failing part does not
# lose the others. XLA:GPU compiles this model for minutes (session 2: the full step
# not within 220 s), so our four parts compile side by side (CPU work) and take turns
# on the GPU: every timed section, the matmul peak included, holds one file lock.
# transformers runs after our three timed parts, while at most the largest-batch probe
# still compiles. XLA's autotuning is off (level 0: its heuristics' choices, no
# timing of candidate kernels on the GPU) unless XLA_FLAGS says otherwise: it would
# both lengthen the compiles and put work on the GPU while another part times.
set -uo pipefail
out=${1:-${OUT:-/tmp/mtaclip_gpu}}
mkdir -p "$out"
log="$out/gpu_benchmark.txt"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=0}
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
size=${SIZE:-512} batch=${BATCH:-16} steps=${STEPS:-5} limit=${LIMIT:-400}
lock=$(mktemp /tmp/mtaclip_gpu_lock.XXXXXX)
common=(--size "$size" --bf16 --steps "$steps" --warmup 2 --lock "$lock")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$log"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax',
  flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__,
  jax.devices())" 2>&1 | tee -a "$log"

part() {  # part NAME SECONDS ARGS...: one benchmark process with a time limit
  local name=$1 limit=$2; shift 2
  { echo "+ python3 -m benchmarks.train_step $*"
    timeout "$limit" python3 -m benchmarks.train_step "$@" 2>&1 \
      | grep --line-buffered -v -E "^(W|I)[0-9]{4} "
    echo "(exit ${PIPESTATUS[0]}, $SECONDS s into the run)"; } > "$out/part_$name.txt"
}

start=$SECONDS
part full "$limit" "${common[@]}" --batch "$batch" --which full --text &
p1=$!
part baseline "$limit" "${common[@]}" --batch "$batch" --which baseline &
p2=$!
part inference "$limit" "${common[@]}" --inference --which full &
p3=$!
part max_batch $((limit + 60)) "${common[@]}" --which "" --max-batch 128 &
p4=$!
wait $p1 $p2 $p3
part hf 120 "${common[@]}" --batch "$batch" --which hf
part hf_inference 60 "${common[@]}" --inference --which hf
wait $p4
for name in full baseline inference hf hf_inference max_batch; do
  cat "$out/part_$name.txt" >> "$log"
done
rm -f "$out"/part_*.txt "$lock"
echo "all parts done in $((SECONDS - start)) s" >> "$log"
cat "$log"
