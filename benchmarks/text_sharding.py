"""Per-device cost of the prompted text tower with and without a device mesh.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m benchmarks.text_sharding [--arch RN50 --classes 150 --devices 8]

The K x (C+1) prompt sequences do not depend on the batch; `clip.text.shard_sequences`
splits them over the mesh's "data" axis (their [SOT] + contexts tokens, shared by the
C+1 sequences of a context, are computed once per context on every device: K x 9 of
the K x (9 + (C+1) x 4) tokens). This compiles the tower's forward + backward
(to the contexts, as in training) on one device and on a ("data",) mesh of `--devices`,
prints XLA's per-device FLOPs for both and checks the outputs agree.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mtaclip_jax.models import clip
from mtaclip_jax.runtime import xla_cpu


def compiled_grad(enc, params, tokens, ctx, mesh=None):
  def loss(c):
    t = enc.apply(params, tokens, c, method="encode_prompts")
    return jnp.sum(jnp.sin(t)), t

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if mesh is None:
    compiled = fn.lower(ctx).compile()
  else:
    with jax.set_mesh(mesh):
      compiled = fn.lower(ctx).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return compiled, float(cost.get("flops", 0.0))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="RN50")
  p.add_argument("--classes", type=int, default=150)
  p.add_argument("--devices", type=int, default=len(jax.devices()))
  p.add_argument("--contexts", type=int, default=3)
  a = p.parse_args(argv)
  arch = clip.get_arch(a.arch)
  enc = clip.TextEncoder(arch)
  rng = np.random.default_rng(0)
  # [SOT] name(3) [EOT]: ids below the EOT id (49407), EOT the largest in each row.
  tokens = np.zeros((a.classes + 1, 5), np.int32)
  tokens[:, 0] = 49406
  tokens[:, 1:4] = rng.integers(1, 40000, (a.classes + 1, 3))
  tokens[:, 4] = 49407
  tokens = jnp.asarray(tokens)
  ctx = jax.random.normal(jax.random.key(1), (a.contexts, 8, arch.text_width)) * 0.02
  params = enc.init(jax.random.key(0), tokens, ctx, method="encode_prompts")
  one, flops_one = compiled_grad(enc, params, tokens, ctx)
  mesh = jax.make_mesh(
      (a.devices,),
      ("data",),
      devices=jax.devices()[: a.devices],
      axis_types=(jax.sharding.AxisType.Auto,),
  )
  many, flops_many = compiled_grad(enc, params, tokens, ctx, mesh)
  (l1, t1), g1 = one(ctx)
  (l2, t2), g2 = many(ctx)
  t_err = float(jnp.max(jnp.abs(t1 - t2)) / jnp.max(jnp.abs(t1)))
  g_err = float(jnp.max(jnp.abs(g1 - g2)) / jnp.max(jnp.abs(g1)))
  n = a.contexts * (a.classes + 1)
  print(
      f"{n} prompt sequences, text tower {arch.name}: per-device GFLOP "
      f"1 device {flops_one / 1e9:.2f}, {a.devices} devices {flops_many / 1e9:.2f} "
      f"(ratio {flops_many / flops_one:.3f}; 1/devices = {1 / a.devices:.3f} for the "
      f"sequences' own tokens, the shared part on every device)"
  )
  print(f"OK ratio={flops_many / flops_one:.4f} out_err={t_err:.2e} grad_err={g_err:.2e}")


if __name__ == "__main__":
  xla_cpu.apply()  # before jax starts its CPU backend, as the entry points do
  main()
