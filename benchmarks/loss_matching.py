"""Times Hungarian matching (host callback and on device) against a full loss + gradient,
and the mask head's backward through the dense masks vs through their factors.

ADE20k-like shapes by default (B=2, Q=100, T=30, L=9, masks 128x128 at stride 4,
targets 512x512, C=150, K=3, D=1024, 12544 points). Prints min / median of N runs.

  python benchmarks/loss_matching.py [--batch 2] [--targets 30] [--runs 5]
"""

import argparse
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from mtaclip_jax.objective import losses
from mtaclip_jax.objective.matching import costs
from mtaclip_jax.objective.matching import host
from mtaclip_jax.objective.matching import hungarian
from mtaclip_jax.runtime import xla_cpu


def _time(fn, *args, runs):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times), 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--queries", type=int, default=100)
  parser.add_argument("--targets", type=int, default=30)
  parser.add_argument("--valid", type=int, default=15, help="valid segments per image")
  parser.add_argument("--layers", type=int, default=9)
  parser.add_argument("--classes", type=int, default=150)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--contexts", type=int, default=3)
  parser.add_argument("--embed", type=int, default=1024)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--neg", default="mix")
  parser.add_argument("--mask-dim", type=int, default=256)
  args = parser.parse_args()
  cfg = types.SimpleNamespace(
      **dict(  # attribute access, like config.loss
          class_weight=2.0,
          mask_weight=5.0,
          dice_weight=5.0,
          sim_weight=1.0,
          no_object_weight=0.1,
          num_points=12544,
          oversample_ratio=3.0,
          importance_sample_ratio=0.75,
          similarity=True,
          neg=args.neg,
          tau=1.0,
      )
  )
  L, B, Q, T, C = args.layers, args.batch, args.queries, args.targets, args.classes
  h, H = args.size // 4, args.size
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  outputs = {
      "logits": jnp.asarray(rng.normal(size=(L, B, Q, C + 1)), jnp.float32),
      "masks": jnp.asarray(3 * rng.normal(size=(L, B, Q, h, h)), jnp.float32),
      "m_proj": jnp.asarray(unit(rng.normal(size=(L, B, Q, args.embed))), jnp.float32),
      "t_proj": jnp.asarray(
          unit(rng.normal(size=(L, B, args.contexts, C + 1, args.embed))), jnp.float32
      ),
  }
  valid = np.zeros((B, T), bool)
  valid[:, : args.valid] = True
  batch = {
      "masks": jnp.asarray(rng.random((B, T, H, H)) < 0.3, jnp.uint8),
      "classes": jnp.asarray(rng.integers(0, C, (B, T)), jnp.int32),
      "valid": jnp.asarray(valid),
  }
  print(
      f"devices: {jax.devices()}; L={L} B={B} Q={Q} T={T} (valid {args.valid}) "
      f"C={C} masks {h}x{h} targets {H}x{H}"
  )

  points = hungarian.sample_match_points(jax.random.key(0), L, B, cfg.num_points)
  cost_fn = jax.jit(
      lambda o, bt, p: costs.match_costs(o["logits"], o["masks"], bt["masks"], bt["classes"], p)
  )
  cost = cost_fn(outputs, batch, points)
  assign = jax.jit(hungarian.hungarian_match)
  on_device = jax.jit(lambda c, v: hungarian.hungarian_match(c, v, matcher="device"))
  same = np.array_equal(
      np.asarray(assign(cost, batch["valid"])), np.asarray(on_device(cost, batch["valid"]))
  )
  print(f"host and device matchers give the same assignment: {same}")
  results = {
      "hungarian callback (jit, all layers, one callback)": _time(
          assign, cost, batch["valid"], runs=args.runs
      ),
      "hungarian on device (jit, all layers, matcher=device)": _time(
          on_device, cost, batch["valid"], runs=args.runs
      ),
      "matching costs on device": _time(costs, outputs, batch, points, runs=args.runs),
      "matching total (costs + callback)": _time(
          jax.jit(lambda o, bt, p: hungarian.match(o, bt, p, cfg)),
          outputs,
          batch,
          points,
          runs=args.runs,
      ),
      "loss forward": _time(
          jax.jit(lambda o, bt, k: losses.compute_loss(o, bt, k, cfg, C)[0]),
          outputs,
          batch,
          jax.random.key(1),
          runs=args.runs,
      ),
      "loss + grad": _time(
          jax.jit(jax.value_and_grad(lambda o, bt, k: losses.compute_loss(o, bt, k, cfg, C)[0])),
          outputs,
          batch,
          jax.random.key(1),
          runs=args.runs,
      ),
  }
  # The model's mask head: masks = einsum(mask_embed, mask_features). Differentiated
  # through the dense masks (autodiff) or through the factors (matched queries only).
  factors = {
      "mask_embed": jnp.asarray(rng.normal(size=(L, B, Q, args.mask_dim)) / 16, jnp.float32),
      "mask_features": jnp.asarray(rng.normal(size=(B, h, h, args.mask_dim)), jnp.float32),
  }
  head = lambda f: jnp.einsum("lbqe,bhwe->lbqhw", f["mask_embed"], f["mask_features"])

  def head_loss(f, o, bt, k, factored):
    extra = f if factored else {}
    return losses.compute_loss(dict(o, masks=head(f), **extra), bt, k, cfg, C)[0]

  for name, factored in (("through the masks", False), ("through the factors", True)):
    results[f"mask head + loss + grad, {name}"] = _time(
        jax.jit(jax.value_and_grad(lambda f, o, bt, k, fac=factored: head_loss(f, o, bt, k, fac))),
        factors,
        outputs,
        batch,
        jax.random.key(1),
        runs=args.runs,
    )
  host_cost, host_valid = np.asarray(cost), np.asarray(valid)
  start = time.perf_counter()
  for _ in range(args.runs):
    host.assign_on_host(host_cost, host_valid)  # pylint: disable=protected-access
  results["scipy alone (host, no callback)"] = (
      1e3 * (time.perf_counter() - start) / args.runs,
  ) * 2
  for name, (best, median) in results.items():
    print(f"{name:55s} min {best:9.1f} ms   median {median:9.1f} ms")


if __name__ == "__main__":
  xla_cpu.apply()  # before jax starts its CPU backend, as the entry points do
  main()
