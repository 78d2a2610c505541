"""The benchmark helpers that gpu.sh relies on: the device lock, the FLOP count, and
reading a profiler trace (CPU or GPU)."""

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops
from benchmarks import profile_step
from benchmarks import train_step as bench
from mtaclip_jax.config import recipes

_HOLD = """
import fcntl, sys, time
with open(sys.argv[1], "a") as f:
  fcntl.flock(f, fcntl.LOCK_EX)
  print("held", flush=True)
  time.sleep(1.5)
"""


def test_lock_serialises_processes_and_nests(tmp_path):
  path = str(tmp_path / "lock")
  other = subprocess.Popen([sys.executable, "-c", _HOLD, path], stdout=subprocess.PIPE, text=True)
  assert other.stdout.readline().strip() == "held"
  bench.LOCK[0] = path
  try:
    t = time.perf_counter()
    with bench.exclusive():
      waited = time.perf_counter() - t
      with bench.exclusive():  # nested in one process: no self-deadlock
        pass
  finally:
    bench.LOCK[0] = ""
    other.wait(30)
  assert waited > 0.5, waited


def test_hlo_flops_counts_the_traced_program():
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 16), jnp.float32)
  lowered = jax.jit(lambda x, y: x @ y).lower(a, b)
  assert bench.hlo_flops(lowered) == 2 * 64 * 32 * 16


def _xla_flops(fn, *args):
  return bench.hlo_flops(jax.jit(fn).lower(*args))


def test_jaxpr_flops_equal_xla_for_matmuls_and_convolutions():
  """Programs of matmuls and convolutions only: the jaxpr count equals XLA's cost
  analysis (CPU), gradients (conv weight gradients use batch groups) included."""
  rng = jax.random.key(0)
  x = jax.random.normal(rng, (2, 12, 10, 6))
  w = jax.random.normal(rng, (3, 3, 6, 8))
  wg = jax.random.normal(rng, (3, 3, 2, 9))  # 3 feature groups
  a = jax.random.normal(rng, (4, 5, 7))
  b = jax.random.normal(rng, (4, 7, 3))
  conv = lambda x, w, g=1, s=1, pad="VALID": jax.lax.conv_general_dilated(
      x, w, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g
  )
  cases = [
      (lambda a, b: jnp.einsum("bij,bjk->bik", a, b), (a, b)),
      (lambda x, w: conv(x, w, s=2), (x, w)),
      (lambda x, w: conv(x, w, s=2, pad="SAME"), (x, w)),  # taps on padding: not counted
      (lambda x, w: conv(x, w, g=3), (x, wg)),
      (jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)), (x, w)),
  ]
  for fn, args in cases:
    traced = jax.jit(fn).trace(*args)
    model = flops.jaxpr_flops(traced.jaxpr)
    assert model > 0
    if fn is cases[-1][0]:  # XLA also counts the square and its gradient
      assert 0 < _xla_flops(fn, *args) - model < 0.01 * model
    else:
      assert model == _xla_flops(fn, *args)


def test_jaxpr_flops_loops_and_branches():
  a = jnp.ones((8, 8))
  one = 2 * 8**3
  scan = lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]
  cond = lambda a: jax.lax.cond(a[0, 0] > 0, lambda a: a @ a @ a, lambda a: a @ a, a)
  inner = jax.jit(lambda a: a @ a)
  assert flops.jaxpr_flops(jax.make_jaxpr(scan)(a)) == 5 * one
  assert one <= _xla_flops(scan, a) < 2 * one  # XLA counts the loop body once
  assert flops.jaxpr_flops(jax.make_jaxpr(cond)(a)) == 2 * one
  assert flops.jaxpr_flops(jax.make_jaxpr(lambda a: inner(a) @ a)(a)) == 2 * one


def test_step_flops_reports_both_counts():
  traced = jax.jit(lambda x, y: x @ y).trace(jnp.ones((64, 32)), jnp.ones((32, 16)))
  assert bench.step_flops(traced) == (2 * 64 * 32 * 16, 2 * 64 * 32 * 16)
  text = bench.flops_text((2e9, 0.0), 1.0, 4.0)
  assert "2 GFLOP matmul+conv" in text and "none" in text and "50.0% of peak" in text


def test_op_times_keeps_only_device_kernels_when_the_trace_has_them():
  meta = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0 NVIDIA H100"}},
  ]
  events = meta + [
      {"ph": "X", "pid": 1, "name": "ThunkExecutor::Execute", "dur": 5e6},
      {"ph": "X", "pid": 1, "name": "loop_fusion_3", "dur": 9e6},  # host launch
      {"ph": "X", "pid": 7, "name": "loop_fusion_3", "dur": 2e6},
      {"ph": "X", "pid": 7, "name": "sm90_gemm", "dur": 1e6, "args": {"hlo_op": "custom-call.4"}},
      {"ph": "X", "pid": 7, "name": "loop_fusion_3", "dur": 2e6},
  ]
  ops, what = profile_step.op_times(events)
  assert what == "device kernels"
  assert ops == {"loop_fusion_3": 4.0, "custom-call.4": 1.0}
  host, what = profile_step.op_times(meta[:1] + events[2:4] + events[3:4])
  assert what == "host op events" and host == {"loop_fusion_3": 18.0}
  where = {"loop_fusion.3": "model.py:1 conv"}
  assert profile_step.source_of("loop_fusion_3", where) == "model.py:1 conv"
  assert profile_step.source_of("unknown_7", where) == "?"


HLO_WITH_FRAMES = """HloModule jit_step

FileNames
1 "/src/mtaclip_jax/models/pixel_decoder.py"
2 "/src/mtaclip_jax/train_state.py"

FunctionNames
1 "__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=105 end_line=105 column=4 end_column=60}
2 {file_name_id=2 function_name_id=1 line=42 end_line=42 column=1 end_column=9}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=2}

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(step)/encoder/fc1/dot_general" stack_frame_id=2}
}
"""


def test_hlo_sources_resolves_stack_frames():
  where = profile_step.hlo_sources(HLO_WITH_FRAMES)
  assert where["fusion.3"] == "pixel_decoder.py:105 fc1/dot_general"
  assert profile_step.source_of("fusion_3", where) == "pixel_decoder.py:105 fc1/dot_general"


def test_idle_gaps_are_holes_in_the_union_of_device_kernels():
  meta = [
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0 NVIDIA H200"}}
  ]
  kernels = [  # (start us, duration us, name); two streams overlap at 10-30
      (0, 30, "a"),
      (10, 5, "b"),
      (50, 10, "pure_callback.1"),
      (60, 20, "c"),
      (200, 10, "d"),
  ]
  events = meta + [{"ph": "X", "pid": 7, "ts": t, "dur": d, "name": n} for t, d, n in kernels]
  events.append({"ph": "X", "pid": 1, "ts": 90, "dur": 50, "name": "host"})  # not device
  idle, gaps = profile_step.idle_gaps(events)
  assert abs(idle - 140e-6) < 1e-12
  assert gaps == [(120e-6, "c", "d"), (20e-6, "a", "pure_callback.1")]
  assert profile_step.idle_gaps(events[1:]) == (0.0, [])  # no device timeline


def test_config_overrides_take_the_entry_type_and_name_unknown_keys():
  config = recipes.paper_config("ade20k", "RN50", "bf16")
  bench.apply_overrides(
      config,
      [
          "model.attention_impl=cudnn",
          "train.micro_batches=2",
          "model.joint_self_attn=false",
          "loss.class_weight=1.5",
      ],
  )
  assert config.model.attention_impl == "cudnn" and config.train.micro_batches == 2
  assert config.model.joint_self_attn is False and config.loss.class_weight == 1.5
  for bad in ("model.attention_implx=xla", "modle.dtype=float32", "model.dtype"):
    with pytest.raises(SystemExit, match=bad.split("=")[0].replace(".", r"\.")):
      bench.apply_overrides(config, [bad])
