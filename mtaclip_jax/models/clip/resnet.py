"""OpenAI CLIP ModifiedResNet (RN50 / RN101) with dense multi-level outputs.

Mirrors `clip/model.py`: 3-conv stem with an average pool, Bottlenecks whose stride is
an average pool after conv2 (and before the downsample conv), and the AttentionPool2d
head. Parameter paths mirror the PyTorch state dict (`layer1/0/downsample/0/kernel` for
`visual.layer1.0.downsample.0.weight`). Images are NHWC.

Norm: "frozen_bn" always uses the running statistics (in the `batch_stats` collection);
"bn" uses batch statistics when `train=True` (under jit with a batch sharded over
devices the statistics are global, i.e. a cross-replica batch norm).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtaclip_jax.models.clip.resize import resize_positional_embedding
from mtaclip_jax.models.ops.conv import Conv2d
from mtaclip_jax.models.ops.conv import conv2d
from mtaclip_jax.models.ops.pointwise import PointwiseConv
from mtaclip_jax.models.ops.pointwise import add_bias
from mtaclip_jax.models.ops.pointwise import pointwise_conv

NORMS = ("frozen_bn", "bn")


def _avg_pool(x, stride):
  if stride == 1:
    return x
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding="VALID")


def _conv(features, kernel, dtype, name, stride=1):
  if kernel == 1 and stride == 1:
    return PointwiseConv(features, use_bias=False, dtype=dtype, name=name)
  pad = kernel // 2
  return Conv2d(
      features, (kernel, kernel), (stride, stride), pad, use_bias=False, dtype=dtype, name=name
  )


def _bn(dtype, name):
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class _Kernel(nn.Module):
  """The `kernel` of a bias-free `nn.Conv` (same name, shape and initialiser)."""

  shape: tuple

  @nn.compact
  def __call__(self):
    return self.param("kernel", nn.initializers.lecun_normal(), self.shape, jnp.float32)


class _FrozenBN(nn.Module):
  """The variables of `nn.BatchNorm` (same names and initialisers), for folding."""

  features: int

  @nn.compact
  def __call__(self):
    scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, (self.features,), jnp.float32)
    return scale, bias, mean.value, var.value


def conv_bn(x, features, kernel, dtype, conv_name, bn_name, *, running, stride=1):
  """A bias-free conv followed by BatchNorm, as `_bn(...)(_conv(...)(x))`.

  With running statistics (frozen BN, or eval) the BN is an affine map per output
  channel, folded into the convolution: conv(x, w * s) + (b - mean * s) with
  s = scale / sqrt(var + eps). The result is the same up to rounding, the parameter
  tree is the same, and the step saves the BN's elementwise passes over the
  activations and the reductions of its scale gradient. Must be called inside a
  compact method (the variables belong to the caller's scope)."""
  if not running:
    return _bn(dtype, bn_name)(
        _conv(features, kernel, dtype, conv_name, stride)(x), use_running_average=False
    )
  w = _Kernel((kernel, kernel, x.shape[-1], features), name=conv_name)()
  scale, bias, mean, var = _FrozenBN(features, name=bn_name)()
  s = scale * jax.lax.rsqrt(var + 1e-5)
  x, w = x.astype(dtype), (w * s).astype(dtype)
  if kernel == 1 and stride == 1:
    y = pointwise_conv(x, w[0, 0])
  else:
    pad = kernel // 2
    y = conv2d(x, w, (stride, stride), pad)
  return add_bias(y, (bias - mean * s).astype(dtype))


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  norm: str = "frozen_bn"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    running = self.norm == "frozen_bn" or not train
    out = nn.relu(conv_bn(x, self.planes, 1, self.dtype, "conv1", "bn1", running=running))
    out = nn.relu(conv_bn(out, self.planes, 3, self.dtype, "conv2", "bn2", running=running))
    out = _avg_pool(out, self.stride)
    out = conv_bn(out, self.planes * 4, 1, self.dtype, "conv3", "bn3", running=running)
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * 4:
      identity = Downsample(self.planes * 4, self.stride, self.norm, self.dtype, name="downsample")(
          x, train
      )
    return nn.relu(out + identity)


class Downsample(nn.Module):
  """`downsample` Sequential: "-1" avgpool (no params), "0" 1x1 conv, "1" BN."""

  features: int
  stride: int
  norm: str = "frozen_bn"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    running = self.norm == "frozen_bn" or not train
    x = _avg_pool(x, self.stride)
    return conv_bn(x, self.features, 1, self.dtype, "0", "1", running=running)


class ResLayer(nn.Module):
  """`layerN` Sequential of Bottlenecks named "0", "1", ..."""

  planes: int
  blocks: int
  stride: int
  norm: str = "frozen_bn"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(self.blocks):
      x = Bottleneck(self.planes, self.stride if i == 0 else 1, self.norm, self.dtype, name=str(i))(
          x, train
      )
    return x


class AttentionPool2d(nn.Module):
  """QKV attention pooling; the query is the mean token. The positional embedding is
  resized bicubically for feature maps other than the native `spacial_dim` grid."""

  spacial_dim: int
  embed_dim: int
  num_heads: int
  output_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    pos = self.param(
        "positional_embedding",
        nn.initializers.normal(c**-0.5),
        (self.spacial_dim**2 + 1, c),
        jnp.float32,
    )
    pos = resize_positional_embedding(pos, (self.spacial_dim, self.spacial_dim), (h, w))
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    x = x + pos.astype(x.dtype)[None]
    dense = lambda f, n: nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32, name=n)
    hd = c // self.num_heads
    # Only the mean token's output is used, so only its query is computed.
    q = dense(c, "q_proj")(x[:, :1]).reshape(b, 1, self.num_heads, hd)
    k = dense(c, "k_proj")(x).reshape(b, h * w + 1, self.num_heads, hd)
    v = dense(c, "v_proj")(x).reshape(b, h * w + 1, self.num_heads, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd**-0.5), k).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, c)
    return dense(self.output_dim, "c_proj")(out)


class ModifiedResNet(nn.Module):
  """CLIP `visual` ModifiedResNet: images [B,H,W,3] -> res2..res5 + embedding."""

  layers: Sequence[int]
  output_dim: int
  heads: int
  input_resolution: int = 224
  width: int = 64
  norm: str = "frozen_bn"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    running = self.norm == "frozen_bn" or not train
    x = images.astype(self.dtype)
    w = self.width
    x = nn.relu(conv_bn(x, w // 2, 3, self.dtype, "conv1", "bn1", running=running, stride=2))
    x = nn.relu(conv_bn(x, w // 2, 3, self.dtype, "conv2", "bn2", running=running))
    x = nn.relu(conv_bn(x, w, 3, self.dtype, "conv3", "bn3", running=running))
    x = _avg_pool(x, 2)
    outputs = {}
    for i, (blocks, mult) in enumerate(zip(self.layers, (1, 2, 4, 8))):
      x = ResLayer(
          w * mult, blocks, 1 if i == 0 else 2, self.norm, self.dtype, name=f"layer{i + 1}"
      )(x, train)
      outputs[f"res{i + 2}"] = x
    outputs["embedding"] = AttentionPool2d(
        self.input_resolution // 32,
        w * 32,
        self.heads,
        self.output_dim,
        self.dtype,
        name="attnpool",
    )(x)
    return outputs
