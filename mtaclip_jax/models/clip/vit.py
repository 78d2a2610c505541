"""OpenAI CLIP VisionTransformer with dense taps and FPN adapters.

Parameter paths mirror `clip/model.py`'s `visual.*` state dict (`conv1`,
`class_embedding`, `positional_embedding`, `ln_pre`, `transformer/resblocks/N/...`,
`ln_post`, `proj`). The positional embedding is resized bicubically (PyTorch-exact) to
the input's patch grid. Patch tokens after blocks `TAPS` become res2..res5 through the
adapters `fpn1` (ConvTranspose 2x2 -> BN -> GELU -> ConvTranspose 2x2, stride 4),
`fpn2` (ConvTranspose 2x2, stride 8), identity (stride 16) and a 2x2 max pool (stride
32). The adapters are new (random init) and their BN is a trainable batch norm. They
mirror PyTorch's `nn.Sequential(ConvTranspose2d, BatchNorm2d, GELU, ConvTranspose2d)`
(`transpose_kernel=True`: a torch ConvTranspose2d weight [in, out, kh, kw] maps to the
flax kernel by the same transpose(2, 3, 1, 0) as a convolution's).
"""

import flax.linen as nn
import jax.numpy as jnp

from mtaclip_jax.models.clip.resize import resize_positional_embedding
from mtaclip_jax.models.clip.transformer import LayerNorm
from mtaclip_jax.models.clip.transformer import Transformer
from mtaclip_jax.models.ops.conv import Conv2d

TAPS = (3, 5, 7, 11)


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


class Fpn1(nn.Module):
  """Sequential names: "0" ConvTranspose, "1" BN, "2" GELU, "3" ConvTranspose."""

  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
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
  """Sequential name: "0" ConvTranspose."""

  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _up2(self.width, self.dtype, "0")(x)


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
    return {
        "res2": Fpn1(self.width, self.dtype, name="fpn1")(grids[0], train),
        "res3": Fpn2(self.width, self.dtype, name="fpn2")(grids[1]),
        "res4": grids[2],
        "res5": nn.max_pool(grids[3], (2, 2), strides=(2, 2), padding="VALID"),
        "embedding": embedding,
    }
