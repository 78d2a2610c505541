"""How much TF32 matmul inputs change the matching costs and assignments (CPU emulation).

The matcher's two cost matmuls run at Precision.HIGH (TF32 on GPUs). This rounds their
inputs to TF32's 10-bit mantissa (round to nearest), computes the costs as
`pairwise_mask_costs` (mtaclip_jax/objective/matching/costs.py) does (float64 here, so
only the input rounding differs) and compares the Hungarian assignments with the exact
ones, on images of random blob targets sampled at the recipe's 12544 points and noisy
predictions of them.

  python -m benchmarks.matcher_precision [--images 20 --targets 8 --queries 100]
"""

import argparse

import numpy as np
from scipy.optimize import linear_sum_assignment

from mtaclip_jax.runtime import xla_cpu


def tf32(x: np.ndarray) -> np.ndarray:
  bits = np.asarray(x, np.float32).view(np.uint32)
  return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def costs(pred, target, probs, softplus_sum, prob_sum, target_sum, points):
  xy = pred.astype(np.float64).T @ target
  py = probs.astype(np.float64).T @ target
  bce = (softplus_sum[:, None] - xy) / points
  dice = 1 - (2 * py + 1) / (prob_sum[:, None] + target_sum[None] + 1)
  return 5 * bce + 5 * dice


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=20)
  p.add_argument("--targets", type=int, default=8)
  p.add_argument("--queries", type=int, default=100)
  p.add_argument("--points", type=int, default=12544)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  changed = total = 0
  worst = 0.0
  for _ in range(a.images):
    pts = rng.random((a.points, 2))
    centres = rng.random((a.targets, 2))
    radius = rng.uniform(0.1, 0.4, a.targets)
    dist = np.linalg.norm(pts[:, None] - centres[None], axis=-1)
    target = np.clip((radius - dist) * 20 + 0.5, 0, 1).astype(np.float32)  # [P, T]
    src = rng.integers(0, a.targets, a.queries)
    pred = (
        (target[:, src] - 0.5) * rng.uniform(2, 10, a.queries)
        + rng.normal(0, 2, (a.points, a.queries))
    ).astype(np.float32)
    probs = 1 / (1 + np.exp(-pred))
    sums = (np.logaddexp(0, pred).sum(0), probs.sum(0), target.sum(0), a.points)
    exact = costs(pred, target, probs, *sums)
    approx = costs(tf32(pred), tf32(target), tf32(probs), *sums)
    worst = max(worst, np.abs(approx - exact).max() / np.abs(exact).max())
    rows_exact = linear_sum_assignment(exact)[0]
    rows_approx = linear_sum_assignment(approx)[0]
    changed += int((rows_exact != rows_approx).sum())
    total += rows_exact.size
  print(
      f"TF32 inputs: largest cost change {worst:.2e} of the largest cost; "
      f"assignments changed {changed} of {total}"
  )


if __name__ == "__main__":
  xla_cpu.apply()  # before jax starts its CPU backend, as the entry points do
  main()
