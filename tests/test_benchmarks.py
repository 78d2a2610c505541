"""The benchmark helpers that gpu.sh relies on: the device lock, the FLOP count, and
reading a profiler trace (CPU or GPU)."""

import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import profile_step
from benchmarks import train_step as bench


_HOLD = """
import fcntl, sys, time
with open(sys.argv[1], "a") as f:
  fcntl.flock(f, fcntl.LOCK_EX)
  print("held", flush=True)
  time.sleep(1.5)
"""


def test_lock_serialises_processes_and_nests(tmp_path):
  path = str(tmp_path / "lock")
  other = subprocess.Popen([sys.executable, "-c", _HOLD, path], stdout=subprocess.PIPE,
                           text=True)
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


def test_op_times_keeps_only_device_kernels_when_the_trace_has_them():
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "process_name", "pid": 7,
           "args": {"name": "/device:GPU:0 NVIDIA H100"}}]
  events = meta + [
      {"ph": "X", "pid": 1, "name": "ThunkExecutor::Execute", "dur": 5e6},
      {"ph": "X", "pid": 1, "name": "loop_fusion_3", "dur": 9e6},  # host launch
      {"ph": "X", "pid": 7, "name": "loop_fusion_3", "dur": 2e6},
      {"ph": "X", "pid": 7, "name": "sm90_gemm", "dur": 1e6,
       "args": {"hlo_op": "custom-call.4"}},
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
