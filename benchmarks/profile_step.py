"""Where the train step's time goes: a jax.profiler trace aggregated by HLO op.

  python -m benchmarks.profile_step [--size 512 --batch 2 --variant baseline|full]

Runs one warm-up step and one profiled step, then prints the top ops by total time
and the share per op category (convolution, dot, gather, scatter, sort/top-k,
reduce, fusion, custom call / callback) read from the Perfetto trace.
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

import mtaclip_jax  # noqa: F401  (XLA:CPU setting before jax starts)
import jax

from benchmarks import train_step as bench

CATEGORIES = [
    ("convolution", r"conv"), ("dot", r"dot|matmul|gemm"), ("gather", r"gather"),
    ("scatter", r"scatter"), ("sort/top-k", r"sort|topk|top_k"),
    ("callback", r"callback|custom-call|custom_call"), ("reduce", r"reduce"),
    ("copy/transpose", r"copy|transpose"),
]


def category(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other (fusions)"


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> "file:line (last op_name part)" from its metadata."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    meta = m.group(2)
    f = re.search(r'source_file="([^"]*)"', meta)
    ln = re.search(r"source_line=(\d+)", meta)
    op = re.search(r'op_name="([^"]*)"', meta)
    src = f"{os.path.basename(f.group(1))}:{ln.group(1)}" if f and ln else "?"
    tail = "/".join(op.group(1).split("/")[-2:]) if op else ""
    out[m.group(1)] = f"{src} {tail}"
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--variant", default="baseline", choices=("baseline", "full"))
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--hlo", default="", help="also write the optimised HLO text here")
  a = p.parse_args()
  mtaclip_jax.xla_cpu.keep_freed_memory_on_cpu()  # as the entry points do
  args = bench._args(["--size", str(a.size), "--batch", str(a.batch), "--steps", "1",
                      "--warmup", "1"])
  from mtaclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  args.max_segments = config_lib.RECIPES["ade20k"]["max_segments"]
  batch = bench.fake_batch(args.batch, args.size, args.segments, args.max_segments)
  out = tempfile.mkdtemp(prefix="mtaclip_profile_")
  orig_timed = bench.timed

  def traced(fn, steps, warmup):
    fn()
    with jax.profiler.trace(out, create_perfetto_trace=True):
      return orig_timed(fn, 1, 0)

  bench.timed = traced
  keep = {}
  times, flops, _ = bench.ours(a.variant, args, batch, keep)
  print(f"profiled step: {times[0]:.2f} s, {flops / 1e9:.0f} GFLOP")
  paths = glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(paths[0], "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events)
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      per_op[e.get("name", "?")] += e["dur"] / 1e6
  # Keep device/XLA op events (skip Python and the enclosing step/executable spans).
  skip = re.compile(r"^(\$|PjitFunction|.*Execute|XlaModule|Thunk|jit_)", re.I)
  ops = {k: v for k, v in per_op.items() if not skip.search(k)}
  total = sum(ops.values())
  print(f"sum of op times {total:.2f} s (ops on 2 threads may overlap)")
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
    by_src[where.get(k, "?")] += v
  print("by source line (from the optimised HLO's metadata):")
  for k, v in by_src.most_common(a.top):
    print(f"  {v:7.3f} s  {100 * v / total:5.1f}%  {k}")
  print("top ops:")
  for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:a.top]:
    print(f"  {v:7.3f} s  {k[:100]}")


if __name__ == "__main__":
  main()
