"""ImageNet ViT (transformers `ViTModel` architecture) with the CLIP ViT's dense taps.

    vit = ImageNetViT(ARCHS["ViT-S/16"])
    feats = vit.apply(variables, images, train=False)
    # {"res2".."res5": [B, H/s, W/s, 384] at strides 4/8/16/32, "embedding": [B, 384]}

Parameter paths mirror transformers 5's `ViTModel` state dict (`embeddings.cls_token`,
`embeddings.position_embeddings`, `embeddings.patch_embeddings.projection`,
`layers.N.{layernorm_before, attention.{q,k,v,o}_proj, layernorm_after, mlp.fc1,
mlp.fc2}`, `layernorm`), so `convert_weights.vit_hf` is key rewriting. Pre-LN blocks,
exact GELU, a class token, learned position embeddings resized bicubically (as
`ViTModel(interpolate_pos_encoding=True)` and the CLIP ViT) to the input's patch grid.
Dense features: patch tokens after blocks `clip.vit.TAPS` through the same adapters as
the CLIP ViT (`clip.vit.feature_pyramid`: `fpn1`..`fpn4`, new modules, random init;
`adapter_norm` as there). "embedding" is the final `layernorm` of the class token (the
segmentation model does not use it).
"""

import dataclasses
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtaclip_jax.models.clip.resize import resize_positional_embedding
from mtaclip_jax.models.clip.transformer import LayerNorm
from mtaclip_jax.models.clip.vit import TAPS
from mtaclip_jax.models.clip.vit import feature_pyramid
from mtaclip_jax.models.ops.conv import Conv2d


@dataclasses.dataclass(frozen=True)
class ViTArch:
  name: str
  image_size: int  # pretraining resolution (sets the position-embedding grid)
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  # timm's, where ImageNet ViT-S/16 weights (DeiT, AugReg) were trained. transformers'
  # ViTConfig defaults to 1e-12 and its conversions of those weights keep 1e-12: a
  # 4e-5 relative difference per block on random weights (docs/BACKBONES.md).
  layer_norm_eps: float = 1e-6


ARCHS: Dict[str, ViTArch] = {
    "ViT-S/16": ViTArch("ViT-S/16", 224, 16, 384, 12, 6, 1536),
}


def dense_features(
    tapped: Sequence[jax.Array],
    grid: Tuple[int, int],
    width: int,
    dtype,
    train: bool,
    adapter_norm: str = "group",
) -> Dict[str, jax.Array]:
  """Token sequences [B, 1 + gh*gw, width] after the four tapped blocks -> res2..res5
  through the CLIP ViT's adapters. Call inside a compact module: it creates the
  adapters `fpn1`..`fpn4` there."""
  b = tapped[0].shape[0]
  grids = [t[:, 1:].reshape(b, grid[0], grid[1], width) for t in tapped]
  return feature_pyramid(grids, width, dtype, adapter_norm, train)


def _dense(features: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


class PatchEmbeddings(nn.Module):
  arch: ViTArch
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.arch.patch_size
    return Conv2d(self.arch.hidden_size, (p, p), (p, p), dtype=self.dtype, name="projection")(
        images
    )


class Embeddings(nn.Module):
  """Patch embedding + class token + position embeddings resized to the grid."""

  arch: ViTArch
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    a = self.arch
    x = PatchEmbeddings(a, self.dtype, name="patch_embeddings")(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    native = a.image_size // a.patch_size
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    pos = self.param(
        "position_embeddings", nn.initializers.normal(0.02), (1, native**2 + 1, d), jnp.float32
    )
    pos = resize_positional_embedding(pos[0], (native, native), (gh, gw))
    x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x.reshape(b, gh * gw, d)], axis=1
    )
    return x + pos.astype(x.dtype)[None], (gh, gw)


class Attention(nn.Module):
  """transformers ViTAttention: separate q/k/v projections, softmax in float32."""

  arch: ViTArch
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, l, d = x.shape
    h = self.arch.num_heads
    q, k, v = (
        _dense(d, self.dtype, n)(x).reshape(b, l, h, d // h) for n in ("q_proj", "k_proj", "v_proj")
    )
    out = nn.dot_product_attention(q, k, v, dtype=self.dtype, force_fp32_for_softmax=True)
    return _dense(d, self.dtype, "o_proj")(out.reshape(b, l, d))


class Mlp(nn.Module):
  arch: ViTArch
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _dense(self.arch.intermediate_size, self.dtype, "fc1")(x)
    x = nn.gelu(x, approximate=False)
    return _dense(self.arch.hidden_size, self.dtype, "fc2")(x)


class Layer(nn.Module):
  """transformers ViTLayer (pre-LN)."""

  arch: ViTArch
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    eps = self.arch.layer_norm_eps
    x = x + Attention(self.arch, self.dtype, name="attention")(
        LayerNorm(eps, name="layernorm_before")(x)
    )
    return x + Mlp(self.arch, self.dtype, name="mlp")(LayerNorm(eps, name="layernorm_after")(x))


class Layers(nn.Module):
  """`layers`: blocks named "0".."num_layers-1"; returns every block's output."""

  arch: ViTArch
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    outputs = []
    for i in range(self.arch.num_layers):
      x = Layer(self.arch, self.dtype, name=str(i))(x)
      outputs.append(x)
    return outputs


class ImageNetViT(nn.Module):
  """images [B,H,W,3] (H, W multiples of 2x the patch) -> res2..res5 + embedding."""

  arch: ViTArch
  dtype: jnp.dtype = jnp.float32
  adapter_norm: str = "group"  # clip.vit.ADAPTER_NORMS

  @nn.compact
  def __call__(self, images, train: bool = False):
    a = self.arch
    _, h, w, _ = images.shape
    if h % a.patch_size or w % a.patch_size:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size " f"{a.patch_size}")
    if a.num_layers <= max(TAPS):
      raise ValueError(
          f"dense taps {TAPS} need at least {max(TAPS) + 1} blocks, " f"got {a.num_layers}"
      )
    x, grid = Embeddings(a, self.dtype, name="embeddings")(images)
    outputs = Layers(a, self.dtype, name="layers")(x)
    feats = dense_features(
        [outputs[t] for t in TAPS], grid, a.hidden_size, self.dtype, train, self.adapter_norm
    )
    feats["embedding"] = LayerNorm(a.layer_norm_eps, name="layernorm")(outputs[-1][:, 0])
    return feats
