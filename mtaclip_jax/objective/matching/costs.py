"""Matching costs between mask-query predictions and ground-truth segments, computed
on device and vectorised over the supervised layers L and the batch B.

Points are (x, y) in [0, 1]^2 with `grid_sample(align_corners=False)` semantics:
pixel centre i of a length-n axis sits at (i + 0.5) / n; outside the image the
value is 0 (padding_mode="zeros"), as in Mask2Former's `point_sample`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bilinear_taps(points: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Flat indices and weights of the 4 bilinear taps of each point.

  Args:
      points: [..., 2] (x, y) in [0, 1].
      height, width: size of the sampled map.

  Returns:
      (indices [..., 4] int32 into the flattened map, weights [..., 4]); taps outside
      the map get weight 0 (zero padding) and a clipped, harmless index.
  """
  x = points[..., 0] * width - 0.5
  y = points[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  wx = jnp.stack([1 - fx, fx, 1 - fx, fx], axis=-1)
  wy = jnp.stack([1 - fy, 1 - fy, fy, fy], axis=-1)
  inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
  weights = jnp.where(inside, wx * wy, 0.0)
  indices = jnp.clip(ys, 0, height - 1) * width + jnp.clip(xs, 0, width - 1)
  return indices, weights


def point_sample(maps: jax.Array, points: jax.Array) -> jax.Array:
  """Bilinearly samples maps at points (torch grid_sample, align_corners=False).

  Args:
      maps: [..., M, H, W] (any dtype; uint8 target masks are gathered as uint8).
      points: [..., P, 2] (x, y) in [0, 1]; leading dims broadcast against maps'
          leading dims (the M maps of a row share that row's points).

  Returns:
      [..., M, P] float32.
  """
  return jnp.swapaxes(point_sample_rows(maps, points), -1, -2)


def point_sample_rows(maps: jax.Array, points: jax.Array) -> jax.Array:
  """`point_sample`, transposed: returns [..., P, M].

  Gathers whole pixel rows of the [H*W, M] transposed maps, one gather per
  bilinear tap; this layout also keeps the following matmuls over P fast
  (XLA:CPU ran the [M, P] layout 4x slower once fused with the cost matmuls).
  """
  *_, m, h, w = maps.shape
  lead = jnp.broadcast_shapes(maps.shape[:-3], points.shape[:-2])
  p = points.shape[-2]
  rows = jnp.swapaxes(jnp.broadcast_to(maps, lead + (m, h, w)).reshape(-1, m, h * w), 1, 2)
  indices, weights = bilinear_taps(points, h, w)  # [..., P, 4]
  indices = jnp.broadcast_to(indices, lead + (p, 4)).reshape(-1, p, 4)
  weights = jnp.broadcast_to(weights, lead + (p, 4)).reshape(-1, p, 4).astype(jnp.float32)

  def sample(r, i, wt):  # r [HW, M], i [P, 4], wt [P, 4]
    out = 0.0
    for c in range(4):
      out = out + r[i[:, c]].astype(jnp.float32) * wt[:, c : c + 1]
    return out

  return jax.vmap(sample)(rows, indices, weights).reshape(lead + (p, m))


def pairwise_mask_costs(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Point-mean sigmoid BCE and dice of every (prediction, target) pair.

  As transformers' `pair_wise_sigmoid_cross_entropy_loss` / `pair_wise_dice_loss`,
  on points-major samples: pred [..., P, Q] logits, target [..., P, T] in [0, 1]
  -> ([..., Q, T], [..., Q, T]). BCE(x, y) = softplus(x) - x y, so the BCE cost
  needs a single matmul with the logits.

  The two matmuls run at Precision.HIGH: float32 on CPU, TF32 on GPUs, 3 bf16
  passes on TPUs. At HIGHEST they were the largest cuBLAS calls of the train step
  on an H200 (2 x 3.5 ms per step at batch 16, 2026-11-27). TF32's rounding of the
  inputs moved the costs by at most 5.6e-6 of their largest and changed none of 160
  assignments (emulated on CPU, 20 images of 8 blob targets, docs/BENCHMARKS.md).
  """
  num_points = pred.shape[-2]
  probs = jax.nn.sigmoid(pred)
  hi = jax.lax.Precision.HIGH
  xy = jnp.einsum("...pq,...pt->...qt", pred, target, precision=hi)
  py = jnp.einsum("...pq,...pt->...qt", probs, target, precision=hi)
  bce = (jnp.sum(jax.nn.softplus(pred), axis=-2)[..., :, None] - xy) / num_points
  denominator = jnp.sum(probs, -2)[..., :, None] + jnp.sum(target, -2)[..., None, :]
  dice = 1.0 - (2.0 * py + 1.0) / (denominator + 1.0)
  return bce, dice


def match_costs(
    logits: jax.Array,
    masks: jax.Array,
    target_masks: jax.Array,
    target_classes: jax.Array,
    points: jax.Array,
    *,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
) -> jax.Array:
  """Matching cost of every (query, target) pair, for every layer and image.

  Args:
      logits: [L, B, Q, C+1] class logits.
      masks: [L, B, Q, h, w] mask logits (stride 4).
      target_masks: [B, T, H, W] binary masks (full resolution, any dtype).
      target_classes: [B, T] int; entries of invalid targets may hold anything.
      points: [L, B, P, 2] uniform points, shared by all pairs of an image.

  Returns:
      [L, B, Q, T] float32 cost = class_weight * (-p[class]) + mask_weight * BCE +
      dice_weight * dice (the cost of invalid targets is meaningless: mask it).
  """
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
  masks = jax.lax.stop_gradient(masks)
  num_labels = logits.shape[-1]
  classes = jnp.clip(target_classes, 0, num_labels - 1)
  probs = jax.nn.softmax(logits, axis=-1)  # [L, B, Q, C+1]
  index = jnp.broadcast_to(classes[None, :, None, :], probs.shape[:-1] + classes.shape[-1:])
  cost_class = -jnp.take_along_axis(probs, index, axis=-1)  # [L, B, Q, T]

  def layer_mask_costs(xs):
    masks_l, points_l = xs
    pred = point_sample_rows(masks_l, points_l)  # [B, P, Q]
    target = point_sample_rows(target_masks, points_l)  # [B, P, T]
    bce, dice = pairwise_mask_costs(pred, target)
    return mask_weight * bce + dice_weight * dice

  # One layer at a time: the sampled taps of all layers at once take GBs.
  return class_weight * cost_class + jax.lax.map(layer_mask_costs, (masks, points))
