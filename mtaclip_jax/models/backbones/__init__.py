"""The backbone registry: the image towers the model can be built on.

    bb = backbones.get("ViT-S/16")
    module = bb.build(dtype=jnp.float32, norm="frozen_bn", adapter_norm="group", name="backbone")
    feats = module.apply(variables, images, train=False)   # {"res2".."res5": NHWC}

Every backbone returns res2..res5 at strides 4/8/16/32 with the channels it declares
(the pixel decoder takes any of them; extra keys such as CLIP's "embedding" are
ignored). `family` says where its weights come from: "clip" towers are converted from
CLIP checkpoints (`config.init.clip`), "imagenet" ones from their own checkpoints
(`config.init.backbone`); an ImageNet backbone's text side is a CLIP text tower chosen
by `config.model.text_encoder` (default `DEFAULT_TEXT_ENCODER`, as in the authors'
released code; docs/RECIPES.md).

Adding a backbone is one module file plus one `register(...)` line below
(docs/BACKBONES.md).
"""

import dataclasses
from typing import Callable, Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp

from mtaclip_jax.models import clip
from mtaclip_jax.models.backbones import mit
from mtaclip_jax.models.backbones import vit_imagenet

STRIDES = (4, 8, 16, 32)
FAMILIES = ("clip", "imagenet")
# CLIP text tower for backbones that have none of their own (the authors' released
# code loads ViT-B/16's; docs/RECIPES.md).
DEFAULT_TEXT_ENCODER = "ViT-B/16"


@dataclasses.dataclass(frozen=True)
class Backbone:
  name: str
  family: str  # "clip" | "imagenet"
  channels: Tuple[int, int, int, int]  # res2..res5
  strides: Tuple[int, int, int, int]  # (4, 8, 16, 32)
  # build(dtype=..., norm=..., adapter_norm=..., name=...) -> module; `norm` applies to
  # batch-normed backbones (CLIP ResNets), `adapter_norm` to the ViTs' FPN adapters;
  # a backbone without either ignores it.
  # module(images [B,H,W,3], train=False) -> {"res2".."res5": NHWC}
  build: Callable[..., nn.Module]

  @property
  def default_text_encoder(self) -> str:
    """The CLIP arch whose text tower pairs with this backbone by default."""
    return self.name if self.family == "clip" else DEFAULT_TEXT_ENCODER


REGISTRY: Dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
  if backbone.family not in FAMILIES:
    raise ValueError(
        f"backbone {backbone.name!r}: family must be one of {FAMILIES}, " f"got {backbone.family!r}"
    )
  if len(backbone.channels) != 4 or tuple(backbone.strides) != STRIDES:
    raise ValueError(
        f"backbone {backbone.name!r}: needs 4 channels and strides "
        f"{STRIDES}, got {backbone.channels} / {backbone.strides}"
    )
  if backbone.name in REGISTRY:
    raise ValueError(f"backbone {backbone.name!r} is already registered")
  REGISTRY[backbone.name] = backbone
  return backbone


def get(name: str) -> Backbone:
  if name not in REGISTRY:
    raise ValueError(f"unknown backbone {name!r}; known: {sorted(REGISTRY)}")
  return REGISTRY[name]


def _clip_backbone(arch: clip.CLIPArch) -> Backbone:
  channels = tuple(arch.feature_channels[f"res{i}"] for i in range(2, 6))

  def build(dtype=None, norm: str = "frozen_bn", adapter_norm: str = "group", name=None):
    kwargs = {} if dtype is None else {"dtype": dtype}
    return clip.ImageEncoder(arch, norm=norm, adapter_norm=adapter_norm, name=name, **kwargs)

  return Backbone(arch.name, "clip", channels, STRIDES, build)


def _imagenet_vit(arch: vit_imagenet.ViTArch) -> Backbone:
  def build(dtype=None, norm: str = "frozen_bn", adapter_norm: str = "group", name=None):
    del norm  # layer norms; the FPN adapter's BN is always trainable (as CLIP ViT's)
    if adapter_norm not in clip.ADAPTER_NORMS:
      raise ValueError(f"adapter_norm must be one of {clip.ADAPTER_NORMS}, got {adapter_norm!r}")
    return vit_imagenet.ImageNetViT(
        arch, jnp.float32 if dtype is None else dtype, adapter_norm, name=name
    )

  return Backbone(arch.name, "imagenet", (arch.hidden_size,) * 4, STRIDES, build)


def _mit(arch_name: str) -> Backbone:
  def build(dtype=None, norm=None, adapter_norm=None, name=None):
    del norm, adapter_norm  # layer norms only, no adapters
    return mit.build(arch_name, dtype, name=name)

  return Backbone(
      arch_name, "imagenet", tuple(mit.MIT_ARCHS[arch_name]["hidden_sizes"]), STRIDES, build
  )


for _arch in clip.ARCHS.values():
  register(_clip_backbone(_arch))
register(_imagenet_vit(vit_imagenet.ARCHS["ViT-S/16"]))
register(_mit("MiT-B4"))
