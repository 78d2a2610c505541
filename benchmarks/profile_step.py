"""Where the train step's time goes: a jax.profiler trace aggregated by HLO op.

  python -m benchmarks.profile_step [--size 512 --batch 2 --variant baseline|full]
         [--bf16] [--steps 1] [--lock FILE]

Runs one warm-up step, `--steps` steps unprofiled (their median is printed beside the
profiled steps': a profiler that slows the step may also skew the op shares) and
`--steps` profiled steps, then prints the top ops by total
time and the share per op category (convolution, dot, gather, scatter, sort/top-k,
reduce, fusion, host callback, custom call = cuBLAS on GPUs) read from the Perfetto
trace. On a GPU only the device's kernels count (the host's launch events are left
out), each under the HLO op that launched it where the trace names one, and the
kernels' total per step against the step's time says how long the GPU sat idle.
Profile a GPU with XLA's command buffers off (`XLA_FLAGS=...
--xla_gpu_enable_command_buffer=`, as benchmarks/gpu.sh does): with them the trace
names only whole CUDA graphs (`command_buffer_N`), not ops.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from benchmarks import train_step as bench
from mtaclip_jax.config import recipes
from mtaclip_jax.runtime import xla_cpu

CATEGORIES = [
    ("convolution", r"conv"),
    ("dot", r"dot|matmul|gemm"),
    ("gather", r"gather"),
    ("scatter", r"scatter"),
    ("sort/top-k", r"sort|topk|top_k"),
    ("host callback", r"callback"),
    # XLA:GPU's cuBLAS matmuls are custom calls (cuDNN convolutions matched above).
    ("custom call (cuBLAS)", r"custom-call|custom_call"),
    ("reduce", r"reduce"),
    ("copy/transpose", r"copy|transpose"),
]


def category(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other (fusions)"


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_SECTION = re.compile(r"^(FileNames|FileLocations|StackFrames)$")


def _frame_locations(hlo_text: str) -> dict[str, str]:
  """stack_frame_id -> "file.py:line" of that (innermost) frame, from the module's
  FileNames / FileLocations / StackFrames tables (how newer XLA prints metadata)."""
  tables, section = {}, None
  for line in hlo_text.splitlines():
    head = _SECTION.match(line)
    if head:
      section = tables.setdefault(head.group(1), {})
      continue
    m = re.match(r"^(\d+) (.*)$", line) if section is not None else None
    if m:
      section[m.group(1)] = m.group(2)
    else:  # a table ends at its first line that is not a row
      section = None
  files = {k: os.path.basename(v.strip('"')) for k, v in tables.get("FileNames", {}).items()}
  out = {}
  for frame, text in tables.get("StackFrames", {}).items():
    loc = re.search(r"file_location_id=(\d+)", text)
    where = tables.get("FileLocations", {}).get(loc.group(1) if loc else "", "")
    f = re.search(r"file_name_id=(\d+)", where)
    ln = re.search(r"\bline=(\d+)", where)
    if f and ln:
      out[frame] = f"{files.get(f.group(1), '?')}:{ln.group(1)}"
  return out


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> "file:line (last op_name part)" from its metadata
  (source_file/source_line, or a stack_frame_id resolved through the module's tables)."""
  frames = _frame_locations(hlo_text)
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    meta = m.group(2)
    f = re.search(r'source_file="([^"]*)"', meta)
    ln = re.search(r"source_line=(\d+)", meta)
    frame = re.search(r"stack_frame_id=(\d+)", meta)
    op = re.search(r'op_name="([^"]*)"', meta)
    if f and ln:
      src = f"{os.path.basename(f.group(1))}:{ln.group(1)}"
    else:
      src = frames.get(frame.group(1), "?") if frame else "?"
    tail = "/".join(op.group(1).split("/")[-2:]) if op else ""
    out[m.group(1)] = f"{src} {tail}"
  return out


# Python, the enclosing step / executable spans and the host's launch bookkeeping.
_SKIP = re.compile(r"^(\$|PjitFunction|.*Execute|XlaModule|Thunk|jit_)", re.I)


def _device_pids(events: list[dict]) -> set:
  """Trace processes that are an accelerator's timeline."""
  return {
      e.get("pid")
      for e in events
      if e.get("ph") == "M"
      and e.get("name") == "process_name"
      and re.search(r"/device:(GPU|TPU)", str(e.get("args", {}).get("name")))
  }


def op_times(events: list[dict]) -> tuple[collections.Counter, str]:
  """Seconds per op from Perfetto trace events -> (counter, what was counted). Where
  the trace holds an accelerator's timeline, only its events count, named by the
  `hlo_op` that launched them when given."""
  device_pids = _device_pids(events)
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if device_pids and e.get("pid") not in device_pids:
      continue
    name = (e.get("args") or {}).get("hlo_op") or e.get("name", "?")
    if not _SKIP.search(name):
      per_op[name] += e["dur"] / 1e6
  return per_op, ("device kernels" if device_pids else "host op events")


def idle_gaps(events: list[dict], top: int = 10) -> tuple[float, list[tuple]]:
  """Where an accelerator sat idle: holes in the union of its kernels' intervals ->
  (total idle seconds, the `top` largest as (seconds, op before, op after)). The
  window is first kernel start to last kernel end; empty without device events."""
  device_pids = _device_pids(events)
  spans = sorted(
      (e["ts"], e["ts"] + e["dur"], (e.get("args") or {}).get("hlo_op") or e.get("name", "?"))
      for e in events
      if e.get("ph") == "X"
      and "dur" in e
      and "ts" in e
      and e.get("pid") in device_pids
      and not _SKIP.search(e.get("name", ""))
  )
  if not spans:
    return 0.0, []
  gaps, end, last = [], spans[0][1], spans[0][2]
  for start, stop, name in spans[1:]:
    if start > end:
      gaps.append(((start - end) / 1e6, last, name))
    if stop > end:
      end, last = stop, name
  return sum(g[0] for g in gaps), sorted(gaps, reverse=True)[:top]


def source_of(op: str, where: dict[str, str]) -> str:
  """An op or kernel name's source line: XLA:GPU names a fusion's kernel after the
  HLO instruction with "." as "_" (fusion.12 -> fusion_12)."""
  return where.get(op) or where.get(re.sub(r"_(\d+)$", r".\1", op)) or "?"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--variant", default="baseline", choices=("baseline", "full"))
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--hlo", default="", help="also write the optimised HLO text here")
  p.add_argument("--bf16", action="store_true")
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--lock", default="", help="as benchmarks.train_step's --lock")
  a = p.parse_args()
  xla_cpu.keep_freed_memory_on_cpu()  # as the entry points do
  args = bench._args(
      ["--size", str(a.size), "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", "1"]
      + (["--bf16"] if a.bf16 else [])
  )
  bench.LOCK[0] = a.lock
  args.max_segments = recipes.RECIPES["ade20k"]["max_segments"]
  batch = bench.fake_batch(args.batch, args.size, args.segments, args.max_segments)
  out = tempfile.mkdtemp(prefix="mtaclip_profile_")
  orig_timed = bench.timed

  plain = []

  def traced(fn, steps, warmup):
    with bench.exclusive():
      for _ in range(warmup):
        fn()
      plain.extend(orig_timed(fn, steps, 0))
      with jax.profiler.trace(out, create_perfetto_trace=True):
        return orig_timed(fn, steps, 0)

  bench.timed = traced
  keep = {}
  times, flops, _ = bench.ours(a.variant, args, batch, keep)
  step_s = sorted(times)[len(times) // 2]
  plain_s = sorted(plain)[len(plain) // 2]
  print(
      f"profiled steps: median {step_s:.3f} s, {flops[0] / 1e9:.0f} GFLOP matmul+conv "
      f"each; the same steps unprofiled, just before: median {plain_s:.3f} s"
  )
  if step_s > 1.1 * plain_s:
    print(
        f"  the profiler slowed the step by {step_s / plain_s - 1:.0%}: op shares may "
        f"be skewed (on XLA:CPU it inflated one strided gather 10x, docs/BENCHMARKS.md, "
        f"'Lessons about measuring'); time a suspect op's fix unprofiled before trusting "
        f"its share"
    )
  paths = glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(paths[0], "rt") as f:
    events = json.load(f)
  ops, where_run = op_times(
      events.get("traceEvents", events) if isinstance(events, dict) else events
  )
  total = sum(ops.values())
  print(
      f"sum of op times over {a.steps} step(s) {total:.3f} s ({where_run}; ops on "
      f"several threads or streams may overlap)"
  )
  if where_run == "device kernels":  # the rest of the step the device sat idle
    idle, gaps = idle_gaps(
        events.get("traceEvents", events) if isinstance(events, dict) else events
    )
    print(
        f"device kernels {total / a.steps:.3f} s per {step_s:.3f} s step; idle "
        f"between kernels {idle / a.steps:.3f} s per step; largest idle gaps "
        f"(op before -> op after):"
    )
    for gap, before, after in gaps:
      print(f"  {gap * 1e3:8.2f} ms  {before[:60]} -> {after[:60]}")
  cats = collections.Counter()
  for k, v in ops.items():
    cats[category(k)] += v
  for c, v in cats.most_common():
    print(f"  {c:18s} {v:7.2f} s  {100 * v / total:5.1f}%")
  hlo = keep["compiled"].as_text()
  if a.hlo:
    with open(a.hlo, "w") as f:
      f.write(hlo)
  where = hlo_sources(hlo)
  by_src = collections.Counter()
  for k, v in ops.items():
    by_src[source_of(k, where)] += v
  print("by source line (from the optimised HLO's metadata):")
  for k, v in by_src.most_common(a.top):
    print(f"  {v:7.3f} s  {100 * v / total:5.1f}%  {k}")
  print("top ops:")
  for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[: a.top]:
    print(f"  {v:7.3f} s  {k[:100]}")


if __name__ == "__main__":
  xla_cpu.apply()  # before jax starts its CPU backend, as the entry points do
  main()
