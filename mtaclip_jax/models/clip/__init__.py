"""CLIP towers: the architecture registry and the two encoders the model builds on.

    arch = clip.ARCHS["RN50"]
    image_encoder = clip.ImageEncoder(arch)          # or clip.ImageEncoder("RN50")
    feats = image_encoder.apply(variables, images, train=False)
    # {"res2".."res5": NHWC at strides 4/8/16/32, "embedding": [B, embed_dim]}
    text_encoder = clip.TextEncoder(arch)
    t = text_encoder.apply({"params": p}, tokens, method="encode_text")

The image encoder's variables mirror OpenAI's `visual.*` state dict and the text
encoder's the text part (`token_embedding`, `transformer`, ...), so
`convert_weights.convert_clip` fills them by key rewriting.
"""

import dataclasses
from typing import Dict, Optional, Tuple, Union

import jax.numpy as jnp

from mtaclip_jax.models.clip.resnet import NORMS
from mtaclip_jax.models.clip.resnet import ModifiedResNet
from mtaclip_jax.models.clip.text import TextTransformer
from mtaclip_jax.models.clip.vit import ADAPTER_NORMS
from mtaclip_jax.models.clip.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class CLIPArch:
  name: str
  embed_dim: int
  image_resolution: int
  vision_layers: Union[Tuple[int, int, int, int], int]  # tuple: ResNet, int: ViT
  vision_width: int
  vision_patch_size: Optional[int]  # None for ResNets
  transformer_width: int
  transformer_heads: int
  transformer_layers: int
  context_length: int = 77
  vocab_size: int = 49408

  @property
  def is_vit(self) -> bool:
    return not isinstance(self.vision_layers, tuple)

  @property
  def vision_heads(self) -> int:
    # as clip/model.py: ResNet attention pool width*32 / 64, ViT width / 64
    return self.vision_width // 64 if self.is_vit else self.vision_width * 32 // 64

  @property
  def text_width(self) -> int:
    return self.transformer_width

  @property
  def text_layers(self) -> int:
    return self.transformer_layers

  @property
  def text_heads(self) -> int:
    return self.transformer_heads

  @property
  def feature_channels(self) -> Dict[str, int]:
    if self.is_vit:
      return {f"res{i}": self.vision_width for i in range(2, 6)}
    return {f"res{i + 2}": self.vision_width * 4 * 2**i for i in range(4)}


ARCHS: Dict[str, CLIPArch] = {
    "RN50": CLIPArch("RN50", 1024, 224, (3, 4, 6, 3), 64, None, 512, 8, 12),
    "RN101": CLIPArch("RN101", 512, 224, (3, 4, 23, 3), 64, None, 512, 8, 12),
    "ViT-B/16": CLIPArch("ViT-B/16", 512, 224, 12, 768, 16, 512, 8, 12),
    # Small ResNet for demos and tests (not a released CLIP model).
    "tiny": CLIPArch("tiny", 64, 224, (1, 1, 1, 1), 16, None, 64, 4, 2),
}


def get_arch(arch: Union[str, CLIPArch]) -> CLIPArch:
  if isinstance(arch, CLIPArch):
    return arch
  if arch not in ARCHS:
    raise ValueError(f"unknown CLIP arch {arch!r}; known: {sorted(ARCHS)}")
  return ARCHS[arch]


def _dtype(dtype):
  return jnp.dtype(dtype)


def ImageEncoder(
    arch: Union[str, CLIPArch],
    dtype=jnp.float32,
    norm: str = "frozen_bn",
    adapter_norm: str = "group",
    **module_kwargs,
):
  """The CLIP image tower as a linen module: `(images [B,H,W,3], train=False) ->
  {"res2".."res5", "embedding"}`. `norm` ("frozen_bn" | "bn") applies to ResNets;
  `adapter_norm` ("group" | "none", vit.ADAPTER_NORMS) to the ViT's FPN adapters, whose
  BN is always trainable. `module_kwargs` (e.g. `name`) go to the module."""
  arch = get_arch(arch)
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  if adapter_norm not in ADAPTER_NORMS:
    raise ValueError(f"adapter_norm must be one of {ADAPTER_NORMS}, got {adapter_norm!r}")
  if arch.is_vit:
    return VisionTransformer(
        arch.image_resolution,
        arch.vision_patch_size,
        arch.vision_width,
        arch.vision_layers,
        arch.vision_heads,
        arch.embed_dim,
        dtype=_dtype(dtype),
        adapter_norm=adapter_norm,
        **module_kwargs,
    )
  return ModifiedResNet(
      arch.vision_layers,
      arch.embed_dim,
      arch.vision_heads,
      arch.image_resolution,
      arch.vision_width,
      norm=norm,
      dtype=_dtype(dtype),
      **module_kwargs,
  )


def TextEncoder(arch: Union[str, CLIPArch], dtype=jnp.float32, **module_kwargs):
  """The CLIP text tower: methods `encode_text(tokens [N, 77]) -> [N, embed_dim]` and
  `encode_prompts(class_tokens [C', 5], contexts [K, 8, width]) -> [K, C', embed_dim]`.
  `__call__` is `encode_text`."""
  arch = get_arch(arch)
  return TextTransformer(
      arch.embed_dim,
      arch.context_length,
      arch.vocab_size,
      arch.transformer_width,
      arch.transformer_heads,
      arch.transformer_layers,
      dtype=_dtype(dtype),
      **module_kwargs,
  )
