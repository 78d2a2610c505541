"""Mask2Former's MSDeformAttn pixel decoder (NHWC).

Parameter names follow transformers' `Mask2FormerPixelDecoder`
(`input_projections.0.0` -> `input_projections_0/conv`, `encoder.layers.0` ->
`encoder/layers_0`, `adapter_1`, `layer_1`, `mask_projection`, `level_embed`).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtaclip_jax.models.ops.conv import Conv2d
from mtaclip_jax.models.ops.deform_attn import MSDeformAttn
from mtaclip_jax.models.ops.pointwise import Dense
from mtaclip_jax.models.ops.pointwise import PointwiseConv

FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# Detectron2's c2_xavier_fill (kaiming_uniform with a=1), as Mask2Former.
conv_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def sine_position_embedding(
    height: int, width: int, num_feats: int = 128, temperature: float = 10000.0
) -> np.ndarray:
  """DETR sine embedding with normalize=True (no padding): [H, W, 2*num_feats],
  y features first, then x; sin/cos interleaved as in Mask2Former."""
  eps = 1e-6
  scale = 2.0 * math.pi
  y = np.arange(1, height + 1, dtype=np.float32)
  x = np.arange(1, width + 1, dtype=np.float32)
  y = y / (y[-1] + eps) * scale
  x = x / (x[-1] + eps) * scale
  dim_t = np.arange(num_feats, dtype=np.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / num_feats)

  def embed(v):
    p = v[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], -1).reshape(len(v), num_feats)

  pos_y = np.broadcast_to(embed(y)[:, None, :], (height, width, num_feats))
  pos_x = np.broadcast_to(embed(x)[None, :, :], (height, width, num_feats))
  return np.concatenate([pos_y, pos_x], -1).astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch `interpolate(mode="bilinear", align_corners=False)` on [..., H, W, C]
  (no antialiasing, also when shrinking)."""
  shape = x.shape[:-3] + tuple(size) + x.shape[-1:]
  return jax.image.resize(x, shape, method="linear", antialias=False)


def reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> np.ndarray:
  """Pixel centres of every level, normalised: [S, L, 2] (x, y)."""
  refs = []
  for h, w in spatial_shapes:
    ry, rx = np.meshgrid(
        np.linspace(0.5, h - 0.5, h, dtype=np.float32) / h,
        np.linspace(0.5, w - 0.5, w, dtype=np.float32) / w,
        indexing="ij",
    )
    refs.append(np.stack([rx.reshape(-1), ry.reshape(-1)], -1))
  refs = np.concatenate(refs, 0)
  return np.repeat(refs[:, None, :], len(spatial_shapes), axis=1)


class ConvNorm(nn.Module):
  """Conv + GroupNorm(32) (+ ReLU), a torch `nn.Sequential(conv, norm[, relu])`."""

  features: int
  kernel_size: int = 1
  use_bias: bool = True
  relu: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    if k == 1:
      x = PointwiseConv(self.features, self.use_bias, self.dtype, conv_init, name="conv")(x)
    else:
      x = Conv2d(
          self.features,
          (k, k),
          padding=k // 2,
          use_bias=self.use_bias,
          dtype=self.dtype,
          kernel_init=conv_init,
          name="conv",
      )(x)
    x = nn.GroupNorm(32, epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name="norm")(x)
    return nn.relu(x) if self.relu else x


class EncoderLayer(nn.Module):
  """Deformable self-attention + FFN, post-norm."""

  d_model: int = 256
  ffn_dim: int = 1024
  n_heads: int = 8
  n_levels: int = 3
  n_points: int = 4
  impl: str = "gather"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pos, refs, spatial_shapes):
    attn = MSDeformAttn(
        self.d_model,
        self.n_heads,
        self.n_levels,
        self.n_points,
        impl=self.impl,
        dtype=self.dtype,
        name="self_attn",
    )
    x = x + attn(x + pos, refs, x, spatial_shapes)
    x = nn.LayerNorm(
        epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name="self_attn_layer_norm"
    )(x)
    y = nn.relu(Dense(self.ffn_dim, dtype=self.dtype, name="fc1")(x))
    y = Dense(self.d_model, dtype=self.dtype, name="fc2")(y)
    return nn.LayerNorm(
        epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name="final_layer_norm"
    )(x + y)


class Encoder(nn.Module):
  num_layers: int = 6
  d_model: int = 256
  ffn_dim: int = 1024
  n_heads: int = 8
  n_levels: int = 3
  n_points: int = 4
  impl: str = "gather"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pos, spatial_shapes):
    refs = jnp.asarray(reference_points(spatial_shapes))[None]
    for i in range(self.num_layers):
      x = EncoderLayer(
          self.d_model,
          self.ffn_dim,
          self.n_heads,
          self.n_levels,
          self.n_points,
          self.impl,
          self.dtype,
          name=f"layers_{i}",
      )(x, pos, refs, spatial_shapes)
    return x


class PixelDecoder(nn.Module):
  """Features {res2..res5} (NHWC) -> mask features at stride 4 and the encoder's
  multi-scale memory, coarsest first (strides 32, 16, 8 for 3 levels)."""

  conv_dim: int = 256
  mask_dim: int = 256
  enc_layers: int = 6
  enc_ffn_dim: int = 1024
  enc_heads: int = 8
  enc_points: int = 4
  num_feature_levels: int = 3
  common_stride: int = 4
  deform_attn_impl: str = "gather"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: dict[str, jax.Array]) -> dict[str, object]:
    names = sorted(FEATURE_STRIDES, key=FEATURE_STRIDES.get)
    missing = [n for n in names if n not in features]
    if missing:
      raise ValueError(f"pixel decoder needs backbone features {names}; missing {missing}")
    trans_names = names[-self.num_feature_levels :][::-1]  # coarsest first
    level_embed = self.param(
        "level_embed", nn.initializers.normal(1.0), (self.num_feature_levels, self.conv_dim)
    )

    srcs, pos, shapes = [], [], []
    for lvl, name in enumerate(trans_names):
      x = ConvNorm(self.conv_dim, 1, dtype=self.dtype, name=f"input_projections_{lvl}")(
          features[name]
      )
      b, h, w, c = x.shape
      shapes.append((h, w))
      srcs.append(x.reshape(b, h * w, c))
      p = sine_position_embedding(h, w, self.conv_dim // 2).reshape(h * w, c)
      pos.append(jnp.asarray(p) + level_embed[lvl])
    src = jnp.concatenate(srcs, 1)
    pos = jnp.concatenate(pos, 0)[None]
    shapes = tuple(shapes)
    memory = Encoder(
        self.enc_layers,
        self.conv_dim,
        self.enc_ffn_dim,
        self.enc_heads,
        self.num_feature_levels,
        self.enc_points,
        self.deform_attn_impl,
        self.dtype,
        name="encoder",
    )(src, pos, shapes)

    outs, start = [], 0
    for h, w in shapes:
      outs.append(memory[:, start : start + h * w].reshape(b, h, w, self.conv_dim))
      start += h * w
    multi_scale = list(outs)

    min_stride = FEATURE_STRIDES[trans_names[-1]]
    num_fpn = int(round(math.log2(min_stride) - math.log2(self.common_stride)))
    # FPN levels are named as transformers does: adapter_1 / layer_1 on the finest.
    for idx in reversed(range(num_fpn)):
      feat = features[names[idx]]
      lateral = ConvNorm(
          self.conv_dim, 1, use_bias=False, dtype=self.dtype, name=f"adapter_{idx + 1}"
      )(feat)
      y = lateral + resize_bilinear(outs[-1], lateral.shape[1:3])
      outs.append(
          ConvNorm(
              self.conv_dim, 3, use_bias=False, relu=True, dtype=self.dtype, name=f"layer_{idx + 1}"
          )(y)
      )
    mask_features = PointwiseConv(
        self.mask_dim, kernel_init=conv_init, dtype=self.dtype, name="mask_projection"
    )(outs[-1])
    return {"mask_features": mask_features, "multi_scale_features": multi_scale}
