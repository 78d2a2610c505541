"""Multi-scale deformable attention (Deformable DETR), pure JAX.

The core `ms_deform_attn_gather` reproduces transformers'
`multi_scale_deformable_attention` (bilinear `grid_sample`, zero padding,
align_corners=False) with one gather over the flattened value maps of all
levels: each sampling point contributes its 4 bilinear corners, out-of-map
corners get weight 0. Implementations are looked up by name in `IMPLS`, so a
fused kernel can be registered next to the gather version.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtaclip_jax.models.ops import deform_attn_cpu
from mtaclip_jax.models.ops.pointwise import Dense

SpatialShapes = Sequence[tuple[int, int]]


@jax.custom_vjp
def _weighted_rows(rows: jax.Array, index: jax.Array, weights: jax.Array) -> jax.Array:
  """out[m] = sum_k weights[m, k] * rows[index[m, k]] in float32.

  rows [N, Dh] (any float dtype), index [M, K] int32 (in range), weights [M, K]
  float32 -> [M, Dh] float32. Its own gradient: the rows' is one scatter-add of
  weights x cotangent, the weights' a second gather reduced against the cotangent;
  only rows, index and weights are kept between the passes, nothing of size M*K*Dh
  (the H200 profile of the autodiff version showed 11.5 ms per step of transposes
  here, docs/BENCHMARKS.md).
  """
  picked = jnp.take(rows, index, axis=0, mode="clip").astype(jnp.float32)
  return jnp.sum(picked * weights[..., None], axis=1)


def _weighted_rows_fwd(rows, index, weights):
  return _weighted_rows(rows, index, weights), (rows, index, weights)


def _weighted_rows_bwd(residuals, g):
  rows, index, weights = residuals
  picked = jnp.take(rows, index, axis=0, mode="clip").astype(jnp.float32)
  d_weights = jnp.sum(picked * g[:, None, :], axis=-1)
  updates = (weights[..., None] * g[:, None, :]).reshape(-1, g.shape[-1])
  # Scatter-add in float32 even for bf16 rows: bf16 scatter-adds are ~15x slower
  # on GPUs (atomics; measured on an H200).
  d_rows = jnp.zeros(rows.shape, jnp.float32).at[index.reshape(-1)].add(updates, mode="clip")
  return d_rows.astype(rows.dtype), None, d_weights


_weighted_rows.defvjp(_weighted_rows_fwd, _weighted_rows_bwd)


def ms_deform_attn_gather(
    value: jax.Array,
    spatial_shapes: SpatialShapes,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
  """Deformable attention core.

  Args:
    value: [B, S, H, Dh], the levels' maps flattened row-major and concatenated
      (S = sum h*w).
    spatial_shapes: static ((h, w), ...) per level.
    sampling_locations: [B, Lq, H, L, P, 2], (x, y) in [0, 1] of each level.
    attention_weights: [B, Lq, H, L, P] (already softmax-ed).

  Returns:
    [B, Lq, H * Dh] in value's dtype.

  Every (image, query, head) reads its L*P*4 bilinear corners as rows of the
  [B*S*H, Dh] value matrix (value's own layout: no transposes), weighted by
  bilinear weight x attention weight; gradients reach the locations through the
  bilinear weights.
  """
  b, s, nh, dh = value.shape
  _, lq, _, nl, npts, _ = sampling_locations.shape
  shapes = np.asarray(spatial_shapes, np.int32).reshape(nl, 2)
  if int(shapes.prod(1).sum()) != s:
    raise ValueError(
        f"spatial_shapes {spatial_shapes} hold {shapes.prod(1).sum()} "
        f"positions but value has {s}"
    )
  starts = np.concatenate([[0], np.cumsum(shapes.prod(1))[:-1]]).astype(np.int32)
  hs = jnp.asarray(shapes[:, 0])[:, None]  # [L, 1], broadcasts over points
  ws = jnp.asarray(shapes[:, 1])[:, None]
  start = jnp.asarray(starts)[:, None]

  loc = sampling_locations.astype(jnp.float32)
  attn = attention_weights.astype(jnp.float32)
  # grid_sample with align_corners=False: pixel = loc * size - 0.5.
  x = loc[..., 0] * ws - 0.5  # [B, Lq, H, L, P]
  y = loc[..., 1] * hs - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  # Row of (image, position, head) in the [B*S*H, Dh] value matrix.
  image = jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None] * s
  head = jnp.arange(nh, dtype=jnp.int32)[None, None, :, None, None]

  idx, wts = [], []
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      inside = (xi >= 0) & (xi < ws) & (yi >= 0) & (yi < hs)
      pos = start + jnp.clip(yi, 0, hs - 1) * ws + jnp.clip(xi, 0, ws - 1)
      idx.append((image + pos) * nh + head)
      wts.append(jnp.where(inside, wy * wx * attn, 0.0))
  taps = nl * npts * 4
  idx = jnp.stack(idx, -1).reshape(b * lq * nh, taps)
  wts = jnp.stack(wts, -1).reshape(b * lq * nh, taps)
  out = _weighted_rows(value.reshape(b * s * nh, dh), idx, wts)
  return out.reshape(b, lq, nh * dh).astype(value.dtype)


IMPLS: dict[str, Callable[..., jax.Array]] = {
    "gather": ms_deform_attn_gather,
    # Fused XLA:CPU custom call (C++, built on first use); "auto" takes it on a
    # one-device CPU run where it builds, else "gather".
    "cpu": deform_attn_cpu.ms_deform_attn_cpu,
    "auto": deform_attn_cpu.auto_impl(ms_deform_attn_gather),
}


def get_impl(name: str) -> Callable[..., jax.Array]:
  if name not in IMPLS:
    raise ValueError(
        f"unknown deformable attention impl {name!r} "
        f"(config.model.deform_attn_impl); known: {sorted(IMPLS)}"
    )
  return IMPLS[name]


def sampling_offsets_bias_init(n_heads: int, n_levels: int, n_points: int):
  """Deformable DETR's directional grid: head h points along angle 2*pi*h/H."""

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(n_heads, dtype=np.float64) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid = grid * np.arange(1, n_points + 1)[None, None, :, None]
    assert grid.size == int(np.prod(shape)), (grid.shape, shape)
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention (names as transformers' Mask2Former)."""

  d_model: int = 256
  n_heads: int = 8
  n_levels: int = 3
  n_points: int = 4
  impl: str = "gather"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      query: jax.Array,
      reference_points: jax.Array,
      value_input: jax.Array,
      spatial_shapes: SpatialShapes,
  ) -> jax.Array:
    """query [B, Lq, C] (position already added), reference_points
    [B, Lq, L, 2] normalised (x, y), value_input [B, S, C] -> [B, Lq, C]."""
    b, lq, _ = query.shape
    s = value_input.shape[1]
    nh, nl, npts = self.n_heads, self.n_levels, self.n_points
    if self.d_model % nh:
      raise ValueError(f"d_model {self.d_model} not divisible by n_heads {nh}")
    xavier = nn.initializers.xavier_uniform()
    value = Dense(self.d_model, kernel_init=xavier, dtype=self.dtype, name="value_proj")(
        value_input
    )
    value = value.reshape(b, s, nh, self.d_model // nh)
    offsets = Dense(
        nh * nl * npts * 2,
        kernel_init=nn.initializers.zeros,
        bias_init=sampling_offsets_bias_init(nh, nl, npts),
        dtype=jnp.float32,
        name="sampling_offsets",
    )(query)
    offsets = offsets.reshape(b, lq, nh, nl, npts, 2)
    logits = Dense(
        nh * nl * npts,
        kernel_init=nn.initializers.zeros,
        dtype=jnp.float32,
        name="attention_weights",
    )(query)
    weights = jax.nn.softmax(logits.reshape(b, lq, nh, nl * npts).astype(jnp.float32), -1)
    weights = weights.reshape(b, lq, nh, nl, npts)
    normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)
    locations = (
        reference_points[:, :, None, :, None, :].astype(jnp.float32)
        + offsets / normalizer[None, None, None, :, None, :]
    )
    out = get_impl(self.impl)(value, spatial_shapes, locations, weights)
    return Dense(self.d_model, kernel_init=xavier, dtype=self.dtype, name="output_proj")(out)
