#!/usr/bin/env bash
# GPU benchmark: this project and transformers' Mask2Former at bf16 on one GPU, in
# one call of under 9 minutes (LIMIT=360 fits the machine's start and one call into a
# 15-minute GPU allocation). docs/BENCHMARKS.md: results.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # env: SIZE=512 BATCH=16 STEPS=5 LIMIT=400
#
# Needs jax with CUDA, flax, optax, orbax, torch and transformers. Wheels in .whl/ (if
# any) are installed to /tmp/site first: the device image lacks ml_collections, grain,
# array_record, portpicker, dm-tree, ftfy, wcwidth and openai-clip (the
# tokenizer's vocabulary) (docs/BENCHMARKS.md says how to fetch them).
# Each part runs in its own process under a time limit, so one failing part does not
# lose the others; the last part is a jax.profiler trace of the full step summarised
# by HLO op (benchmarks/profile_step.py), with the device's idle gaps; two more parts
# time the full step with cuDNN's fused attention in the decoder and with the
# Hungarian on the device (opt-in configs).
# XLA:GPU compiles this model for minutes (with XLA's default flags the full step did
# not compile within 220 s on an H200, 2026-11-26), so our four parts compile side by
# side (CPU work) and take turns on the GPU: every timed section, the matmul peak
# included, holds one file lock. transformers runs after our three timed parts, while
# at most the largest-batch probe still compiles. Unless XLA_FLAGS says otherwise,
# matmuls go to cuBLAS rather than Triton (fewer candidates to autotune) and
# autotuning skips its buffer checks (level 1): on an H100 (2026-11-26) every part
# compiled inside 220 s that way. Level 0 (no autotuning) was a disaster: 11 TFLOP/s
# bf16 matmuls and a 19 s baseline step (docs/BENCHMARKS.md).
set -uo pipefail
out=${1:-${OUT:-/tmp/mtaclip_gpu}}
mkdir -p "$out"
log="$out/gpu_benchmark.txt"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92  # the largest-batch probe's memory limit
export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=1 --xla_gpu_enable_triton_gemm=false}
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
  local name=$1 limit=$2 module=benchmarks.train_step; shift 2
  [ "$name" = profile ] && module=benchmarks.profile_step
  { echo "+ python3 -m $module $*"
    timeout "$limit" python3 -m "$module" "$@" 2>&1 \
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
# The largest batch from compiled memory (16 and 32) only: the confirming run never
# finished inside the limit (H100 2026-11-26, H200 2026-11-27).
part max_batch $((limit + 60)) "${common[@]}" --which "" --max-batch 128 --estimate-only &
p4=$!
# The full step with the decoder's attention in cuDNN's fused kernel (opt-in,
# config.model.attention_impl=cudnn), against part full's default "xla".
part full_cudnn $((limit + 60)) "${common[@]}" --batch "$batch" --which full \
  --set model.attention_impl=cudnn &
p6=$!
# The full step with the Hungarian in XLA (opt-in, config.loss.matcher=device)
# against part full's host callback.
part full_device_matcher $((limit + 60)) "${common[@]}" --batch "$batch" --which full \
  --set loss.matcher=device &
p7=$!
# Command buffers (CUDA graphs) off for the profile only: with them the trace names
# whole graphs, not ops.
XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_command_buffer=" \
  part profile $((limit + 60)) --size "$size" --batch "$batch" --variant full --bf16 \
  --steps 2 --lock "$lock" --top 40 &
p5=$!
wait $p1 $p2 $p3
part hf 120 "${common[@]}" --batch "$batch" --which hf
part hf_inference 60 "${common[@]}" --inference --which hf
wait $p4 $p5 $p6 $p7
for name in full baseline inference hf hf_inference full_cudnn full_device_matcher max_batch \
    profile; do
  cat "$out/part_$name.txt" >> "$log"
done
rm -f "$out"/part_*.txt "$lock"
echo "all parts done in $((SECONDS - start)) s" >> "$log"
cat "$log"
