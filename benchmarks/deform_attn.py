"""Times one deformable attention core, forward and forward + backward, per impl.

Pixel-decoder shapes of a 512x512 crop by default (B=2, 8 heads, Dh=32, levels
16x16/32x32/64x64, every position a query: Lq=5376, 4 points). Jitted, median
of N runs after a warm-up, wall and process CPU seconds (all threads), and
XLA's temporary buffer size of the compiled gradient. The "cpu" kernel's
threads: $MTACLIP_DEFORM_THREADS (default: usable cores).

  python benchmarks/deform_attn.py [--batch 2] [--runs 5] [--impls gather,cpu]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtaclip_jax.models.ops import deform_attn
from mtaclip_jax.runtime import xla_cpu


def _time(fn, args, runs):
  jax.block_until_ready(fn(*args))  # compile + warm up
  wall, cpu = [], []
  for _ in range(runs):
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  return float(np.median(wall)), float(np.median(cpu))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=32)
  parser.add_argument("--levels", default="16x16,32x32,64x64", help="HxW per level")
  parser.add_argument("--queries", type=int, default=0, help="0 = every position")
  parser.add_argument("--points", type=int, default=4)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--impls", default="gather,cpu")
  args = parser.parse_args()
  shapes = tuple(tuple(int(n) for n in lvl.split("x")) for lvl in args.levels.split(","))
  b, nh, dh, npts, nl = args.batch, args.heads, args.head_dim, args.points, len(shapes)
  s = sum(h * w for h, w in shapes)
  lq = args.queries or s
  rng = np.random.default_rng(0)
  value = jnp.asarray(rng.standard_normal((b, s, nh, dh)), jnp.float32)
  # Reference points anywhere in the map plus offsets of a few pixels, as in training.
  loc = rng.random((b, lq, 1, 1, 1, 2)) + rng.normal(0, 0.03, (b, lq, nh, nl, npts, 2))
  loc = jnp.asarray(loc, jnp.float32)
  logits = rng.standard_normal((b, lq, nh, nl * npts))
  attn = jnp.asarray(jax.nn.softmax(logits, -1).reshape(b, lq, nh, nl, npts), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((b, lq, nh * dh)), jnp.float32)
  print(
      f"B={b} heads={nh} Dh={dh} levels={shapes} Lq={lq} P={npts}; "
      f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
      f"median of {args.runs}"
  )

  for name in args.impls.split(","):
    impl = deform_attn.get_impl(name)
    fwd = jax.jit(lambda v, l, a, f=impl: f(v, shapes, l, a))
    loss = lambda v, l, a, f=impl: jnp.sum(f(v, shapes, l, a) * cot)  # noqa: E731
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    inputs = (value, loc, attn)
    temp = grad.lower(*inputs).compile().memory_analysis().temp_size_in_bytes
    fw, fc = _time(fwd, inputs, args.runs)
    gw, gc = _time(grad, inputs, args.runs)
    print(
        f"{name:>7}: forward {1e3 * fw:8.1f} ms wall {fc:6.2f} CPU-s | "
        f"fwd+bwd {1e3 * gw:8.1f} ms wall {gc:6.2f} CPU-s | "
        f"fwd+bwd temp buffers {temp / 2**20:7.1f} MiB"
    )


if __name__ == "__main__":
  xla_cpu.apply()  # before jax starts its CPU backend, as the entry points do
  main()
