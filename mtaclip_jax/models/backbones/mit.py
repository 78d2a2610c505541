"""Mix Transformer (MiT, the SegFormer encoder) returning res2..res5 (docs/BACKBONES.md).

Mirrors transformers' `SegformerModel` (modeling_segformer.py of the pinned transformers
5.x): parameter paths are its state dict keys with dots as nesting, e.g.
`stages/2/blocks/5/attention/sequence_reduction/sequence_reduction/kernel` for
`stages.2.blocks.5.attention.sequence_reduction.sequence_reduction.weight`. Checkpoints
with the older names (`encoder.block.N.M.attention.self.query`, as on the model hub) are
renamed by convert_weights/segformer_hf.py the way transformers renames them on load.

Each stage: overlapping patch embedding (strided conv, padding k//2, + LayerNorm), blocks
of efficient self-attention (keys/values from a strided `sr x sr` conv + LayerNorm) and
Mix-FFN (dense -> 3x3 depthwise conv -> GELU -> dense), then a LayerNorm. Every LayerNorm
uses eps 1e-5 as transformers' modules do (the original NVlabs code uses 1e-6 for the
block and stage norms). Stochastic depth: rates rise linearly from 0 to `drop_path_rate`
over all blocks and are applied only with train=True, drawing from the "dropout" rng.
"""

from typing import Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtaclip_jax.models.clip.transformer import LayerNorm
from mtaclip_jax.models.ops.conv import Conv2d

_B1_B5 = dict(
    hidden_sizes=(64, 128, 320, 512),
    num_attention_heads=(1, 2, 5, 8),
    sr_ratios=(8, 4, 2, 1),
    patch_sizes=(7, 3, 3, 3),
    strides=(4, 2, 2, 2),
    mlp_ratio=4,
)
# SegFormer paper Table 6 / the nvidia/mit-b* configs of transformers.
MIT_ARCHS = {
    "MiT-B0": dict(_B1_B5, depths=(2, 2, 2, 2), hidden_sizes=(32, 64, 160, 256)),
    "MiT-B1": dict(_B1_B5, depths=(2, 2, 2, 2)),
    "MiT-B2": dict(_B1_B5, depths=(3, 4, 6, 3)),
    "MiT-B3": dict(_B1_B5, depths=(3, 4, 18, 3)),
    "MiT-B4": dict(_B1_B5, depths=(3, 8, 27, 3)),
    "MiT-B5": dict(_B1_B5, depths=(3, 6, 40, 3)),
}
LN_EPS = 1e-5


def _conv(features, kernel, stride, padding, dtype, name, groups=1):
  if groups == 1:
    return Conv2d(features, (kernel, kernel), (stride, stride), padding, dtype=dtype, name=name)
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      feature_group_count=groups,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


class SegformerOverlapPatchEmbeddings(nn.Module):
  """[B, H, W, C_in] -> tokens [B, H'*W', hidden] and the grid (H', W')."""

  patch_size: int
  stride: int
  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv(
        self.hidden_size, self.patch_size, self.stride, self.patch_size // 2, self.dtype, "proj"
    )(x)
    b, h, w, c = x.shape
    x = LayerNorm(LN_EPS, name="layer_norm")(x.reshape(b, h * w, c))
    return x, h, w


class SegformerSequenceReduction(nn.Module):
  """Keys/values grid reduced by a `ratio x ratio` conv of stride `ratio` + LayerNorm."""

  ratio: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    b, _, c = x.shape
    x = _conv(c, self.ratio, self.ratio, 0, self.dtype, "sequence_reduction")(x.reshape(b, h, w, c))
    return LayerNorm(LN_EPS, name="layer_norm")(x.reshape(b, -1, c))


class SegformerAttention(nn.Module):
  hidden_size: int
  num_heads: int
  sr_ratio: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    b, n, _ = x.shape
    c = self.hidden_size
    hd = c // self.num_heads
    q = _dense(c, self.dtype, "q_proj")(x).reshape(b, n, self.num_heads, hd)
    kv = x
    if self.sr_ratio > 1:
      kv = SegformerSequenceReduction(self.sr_ratio, self.dtype, name="sequence_reduction")(x, h, w)
    m = kv.shape[1]
    k = _dense(c, self.dtype, "k_proj")(kv).reshape(b, m, self.num_heads, hd)
    v = _dense(c, self.dtype, "v_proj")(kv).reshape(b, m, self.num_heads, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * hd**-0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c)
    return _dense(c, self.dtype, "o_proj")(out)


class SegformerDepthWiseConv(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    b, _, c = x.shape
    x = _conv(c, 3, 1, 1, self.dtype, "dwconv", groups=c)(x.reshape(b, h, w, c))
    return x.reshape(b, h * w, c)


class SegformerMixMLP(nn.Module):
  hidden_size: int
  mlp_ratio: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    x = _dense(self.hidden_size * self.mlp_ratio, self.dtype, "fc1")(x)
    x = SegformerDepthWiseConv(self.dtype, name="dwconv")(x, h, w)
    x = nn.gelu(x, approximate=False)
    return _dense(self.hidden_size, self.dtype, "fc2")(x)


class SegformerLayer(nn.Module):
  """Pre-norm block: x + attn(ln(x)), then x + mix_ffn(ln(x)), with drop path."""

  hidden_size: int
  num_heads: int
  sr_ratio: int
  mlp_ratio: int
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  def _drop_path(self, x, train):
    """Per-sample stochastic depth, as torch: x / keep * floor(U + keep)."""
    if not train or self.drop_path == 0.0:
      return x
    if not self.has_rng("dropout"):
      raise ValueError(
          "MiT drop path (drop_path_rate > 0) with train=True needs a "
          "'dropout' rng: apply(..., rngs={'dropout': key})"
      )
    keep = 1.0 - self.drop_path
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))

  @nn.compact
  def __call__(self, x, h, w, train: bool = False):
    y = SegformerAttention(
        self.hidden_size, self.num_heads, self.sr_ratio, self.dtype, name="attention"
    )(LayerNorm(LN_EPS, name="layernorm_before")(x), h, w)
    x = x + self._drop_path(y, train)
    y = SegformerMixMLP(self.hidden_size, self.mlp_ratio, self.dtype, name="mlp")(
        LayerNorm(LN_EPS, name="layernorm_after")(x), h, w
    )
    return x + self._drop_path(y, train)


class SegformerBlocks(nn.Module):
  """`stages.N.blocks`: blocks named "0".."depth-1"."""

  depth: int
  hidden_size: int
  num_heads: int
  sr_ratio: int
  mlp_ratio: int
  drop_paths: Sequence[float]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w, train: bool = False):
    for j in range(self.depth):
      x = SegformerLayer(
          self.hidden_size,
          self.num_heads,
          self.sr_ratio,
          self.mlp_ratio,
          self.drop_paths[j],
          self.dtype,
          name=str(j),
      )(x, h, w, train)
    return x


class SegformerStage(nn.Module):
  """Patch embedding -> blocks -> LayerNorm; [B, H, W, C_in] -> [B, H/s, W/s, hidden]."""

  depth: int
  hidden_size: int
  num_heads: int
  sr_ratio: int
  patch_size: int
  stride: int
  mlp_ratio: int
  drop_paths: Sequence[float]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x, h, w = SegformerOverlapPatchEmbeddings(
        self.patch_size, self.stride, self.hidden_size, self.dtype, name="patch_embeddings"
    )(x)
    x = SegformerBlocks(
        self.depth,
        self.hidden_size,
        self.num_heads,
        self.sr_ratio,
        self.mlp_ratio,
        tuple(self.drop_paths),
        self.dtype,
        name="blocks",
    )(x, h, w, train)
    x = LayerNorm(LN_EPS, name="layer_norm")(x)
    return x.reshape(x.shape[0], h, w, self.hidden_size)


class SegformerStages(nn.Module):
  """`stages`: stages named "0".."3"; returns every stage's output."""

  depths: Sequence[int]
  hidden_sizes: Sequence[int]
  num_attention_heads: Sequence[int]
  sr_ratios: Sequence[int]
  patch_sizes: Sequence[int]
  strides: Sequence[int]
  mlp_ratio: int
  drop_path_rate: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    total = sum(self.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    outputs, start = [], 0
    for i, depth in enumerate(self.depths):
      x = SegformerStage(
          depth,
          self.hidden_sizes[i],
          self.num_attention_heads[i],
          self.sr_ratios[i],
          self.patch_sizes[i],
          self.strides[i],
          self.mlp_ratio,
          tuple(rates[start : start + depth]),
          self.dtype,
          name=str(i),
      )(x, train)
      outputs.append(x)
      start += depth
    return outputs


class MixVisionTransformer(nn.Module):
  """images [B, H, W, 3] (H, W multiples of 32) -> {"res2".."res5": [B, H/s, W/s, C_s]}
  at strides 4/8/16/32 with channels `hidden_sizes`. `dtype` is the compute dtype;
  parameters are float32."""

  depths: Sequence[int] = MIT_ARCHS["MiT-B4"]["depths"]
  hidden_sizes: Sequence[int] = MIT_ARCHS["MiT-B4"]["hidden_sizes"]
  num_attention_heads: Sequence[int] = MIT_ARCHS["MiT-B4"]["num_attention_heads"]
  sr_ratios: Sequence[int] = MIT_ARCHS["MiT-B4"]["sr_ratios"]
  patch_sizes: Sequence[int] = MIT_ARCHS["MiT-B4"]["patch_sizes"]
  strides: Sequence[int] = MIT_ARCHS["MiT-B4"]["strides"]
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False) -> Dict[str, jax.Array]:
    _, h, w, _ = images.shape
    if h % 32 or w % 32:
      raise ValueError(
          f"MixVisionTransformer: image size {h}x{w} is not a multiple "
          f"of 32 (the stride of res5)"
      )
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(
          f"MixVisionTransformer: drop_path_rate must be in [0, 1), got " f"{self.drop_path_rate}"
      )
    outputs = SegformerStages(
        tuple(self.depths),
        tuple(self.hidden_sizes),
        tuple(self.num_attention_heads),
        tuple(self.sr_ratios),
        tuple(self.patch_sizes),
        tuple(self.strides),
        self.mlp_ratio,
        self.drop_path_rate,
        self.dtype,
        name="stages",
    )(images.astype(self.dtype), train)
    return {f"res{i + 2}": x for i, x in enumerate(outputs)}


def arch_config(arch) -> dict:
  """A name in MIT_ARCHS or a dict of MixVisionTransformer fields -> the fields."""
  if isinstance(arch, str):
    if arch not in MIT_ARCHS:
      raise ValueError(f"unknown MiT arch {arch!r}; known: {sorted(MIT_ARCHS)}")
    return dict(MIT_ARCHS[arch])
  return dict(arch)


def build(
    arch_name: str = "MiT-B4", dtype=jnp.float32, norm=None, **module_kwargs
) -> MixVisionTransformer:
  """The registry's constructor. `norm` is accepted and ignored (MiT uses LayerNorm
  only); `module_kwargs` override the arch's fields (e.g. depths, drop_path_rate) or
  set the module name."""
  del norm
  fields = arch_config(arch_name)
  fields.update(module_kwargs)
  return MixVisionTransformer(dtype=jnp.float32 if dtype is None else dtype, **fields)
