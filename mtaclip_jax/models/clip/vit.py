"""OpenAI CLIP VisionTransformer with dense taps and FPN adapters.

Parameter paths mirror `clip/model.py`'s `visual.*` state dict (`conv1`,
`class_embedding`, `positional_embedding`, `ln_pre`, `transformer/resblocks/N/...`,
`ln_post`, `proj`). The positional embedding is resized bicubically (PyTorch-exact) to
the input's patch grid. Patch tokens after blocks `TAPS` become res2..res5 through the
adapters of the authors' released code (`CLIPVisionTransformer`, patch 16): `fpn1`
(GroupNorm -> ConvTranspose 2x2 -> BN -> GELU -> ConvTranspose 2x2, stride 4), `fpn2`
(GroupNorm -> ConvTranspose 2x2, stride 8), `fpn3` (GroupNorm, stride 16) and `fpn4`
(GroupNorm -> 2x2 max pool, stride 32). Each GroupNorm is torch's `GroupNorm(1, C)`:
statistics over (H, W, C) of each image, a per-channel scale and bias, eps 1e-5.
`norm="none"` (`config.model.adapter_norm`) leaves the four GroupNorms out. The
adapters are new (random init; GroupNorm scale 1, bias 0) and their BN is a trainable
batch norm.

Names: the ConvTranspose / BN / ConvTranspose of `fpn1` keep the indices of
`nn.Sequential(ConvTranspose2d, BatchNorm2d, GELU, ConvTranspose2d)` ("0", "1", "3";
the release's `fpn1.1`, `fpn1.2`, `fpn1.4`) and `fpn2`'s ConvTranspose is "0" (the
release's `fpn2.1`); each adapter's GroupNorm is `fpnN/group_norm` (the release's
`fpn1.0`, `fpn2.0`, `fpn3`, `fpn4.0`). `transpose_kernel=True`: a torch
ConvTranspose2d weight [in, out, kh, kw] maps to the flax kernel by the same
transpose(2, 3, 1, 0) as a convolution's.
"""

import flax.linen as nn
import jax.numpy as jnp

from mtaclip_jax.models.clip.resize import resize_positional_embedding
from mtaclip_jax.models.clip.transformer import LayerNorm
from mtaclip_jax.models.clip.transformer import Transformer
from mtaclip_jax.models.ops.conv import Conv2d

TAPS = (3, 5, 7, 11)
# Normalisation at the start of each adapter: "group" = the release's GroupNorm(1, C),
# "none" = no normalisation there.
ADAPTER_NORMS = ("group", "none")
# The adapters' module names: new modules, not in any pretrained checkpoint.
ADAPTERS = ("fpn1", "fpn2", "fpn3", "fpn4")


def _up2(width, dtype, name):
  """torch ConvTranspose2d(width, width, kernel_size=2, stride=2)."""
  return nn.ConvTranspose(
      width,
      (2, 2),
      strides=(2, 2),
      padding="VALID",
      transpose_kernel=True,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def _adapter_norm(x, norm, dtype):
  """torch GroupNorm(1, C) on NHWC `x` for norm="group" (statistics in float32, with
  the two-pass variance as torch), `x` itself for "none"."""
  if norm not in ADAPTER_NORMS:
    raise ValueError(f"adapter norm must be one of {ADAPTER_NORMS}, got {norm!r}")
  if norm == "none":
    return x
  return nn.GroupNorm(
      num_groups=1,
      epsilon=1e-5,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      name="group_norm",
  )(x)


class Fpn1(nn.Module):
  """Stride 4: [GroupNorm] -> "0" ConvTranspose -> "1" BN -> GELU -> "3" ConvTranspose."""

  width: int
  dtype: jnp.dtype = jnp.float32
  norm: str = "group"  # one of ADAPTER_NORMS

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _adapter_norm(x, self.norm, self.dtype)
    x = _up2(self.width, self.dtype, "0")(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="1",
    )(x)
    x = nn.gelu(x, approximate=False)
    return _up2(self.width, self.dtype, "3")(x)


class Fpn2(nn.Module):
  """Stride 8: [GroupNorm] -> "0" ConvTranspose."""

  width: int
  dtype: jnp.dtype = jnp.float32
  norm: str = "group"

  @nn.compact
  def __call__(self, x):
    return _up2(self.width, self.dtype, "0")(_adapter_norm(x, self.norm, self.dtype))


class Fpn3(nn.Module):
  """Stride 16: [GroupNorm] (no parameters with norm="none")."""

  dtype: jnp.dtype = jnp.float32
  norm: str = "group"

  @nn.compact
  def __call__(self, x):
    return _adapter_norm(x, self.norm, self.dtype)


class Fpn4(nn.Module):
  """Stride 32: [GroupNorm] -> 2x2 max pool (no parameters with norm="none")."""

  dtype: jnp.dtype = jnp.float32
  norm: str = "group"

  @nn.compact
  def __call__(self, x):
    x = _adapter_norm(x, self.norm, self.dtype)
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def feature_pyramid(grids, width: int, dtype, norm: str, train: bool):
  """The four tapped grids [B, gh, gw, width] -> res2..res5 at strides 4/8/16/32
  through the adapters. Call inside a compact module: it creates `fpn1`..`fpn4` there
  (`fpn3` and `fpn4` hold parameters only with norm="group")."""
  return {
      "res2": Fpn1(width, dtype=dtype, norm=norm, name="fpn1")(grids[0], train),
      "res3": Fpn2(width, dtype=dtype, norm=norm, name="fpn2")(grids[1]),
      "res4": Fpn3(dtype=dtype, norm=norm, name="fpn3")(grids[2]),
      "res5": Fpn4(dtype=dtype, norm=norm, name="fpn4")(grids[3]),
  }


class VisionTransformer(nn.Module):
  """CLIP `visual` ViT: images [B,H,W,3] (H, W multiples of the patch) ->
  res2..res5 ([B, H/s, W/s, width]) + embedding [B, output_dim]."""

  input_resolution: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  dtype: jnp.dtype = jnp.float32
  adapter_norm: str = "group"  # one of ADAPTER_NORMS

  @nn.compact
  def __call__(self, images, train: bool = False):
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    scale = self.width**-0.5
    x = Conv2d(self.width, (p, p), (p, p), use_bias=False, dtype=self.dtype, name="conv1")(images)
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(b, gh * gw, self.width)
    cls = self.param("class_embedding", nn.initializers.normal(scale), (self.width,), jnp.float32)
    native = self.input_resolution // p
    pos = self.param(
        "positional_embedding",
        nn.initializers.normal(scale),
        (native**2 + 1, self.width),
        jnp.float32,
    )
    pos = resize_positional_embedding(pos, (native, native), (gh, gw))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], axis=1)
    x = x + pos.astype(x.dtype)[None]
    x = LayerNorm(name="ln_pre")(x)
    taps = [t for t in TAPS if t < self.layers]
    x, tapped = Transformer(self.width, self.layers, self.heads, self.dtype, name="transformer")(
        x, taps=taps
    )
    proj = self.param(
        "proj", nn.initializers.normal(scale), (self.width, self.output_dim), jnp.float32
    )
    embedding = LayerNorm(name="ln_post")(x[:, 0]) @ proj.astype(self.dtype)
    grids = [t[:, 1:].reshape(b, gh, gw, self.width) for t in tapped]
    if len(grids) != 4:
      raise ValueError(f"dense taps {TAPS} need at least 12 blocks, got {self.layers}")
    feats = feature_pyramid(grids, self.width, self.dtype, self.adapter_norm, train)
    feats["embedding"] = embedding
    return feats
