"""ImageNet ViT state dicts -> params of `vit_imagenet.ImageNetViT` (docs/BACKBONES.md).

Sources, detected from the keys:
- transformers `ViTModel` as the pinned transformers 5 names it (`layers.N.attention.
  q_proj`, `layers.N.mlp.fc1`...), and the older names the model hub's files hold
  (`encoder.layer.N.attention.attention.query`, `...attention.output.dense`,
  `...intermediate.dense`, `...output.dense`), renamed here in transformers' own order;
  `vit.` prefixes (`ViTForImageClassification`) are stripped.
- timm-style `VisionTransformer` state dicts:

  | timm                         | ours (transformers 5 names)                 |
  |------------------------------|---------------------------------------------|
  | cls_token                    | embeddings.cls_token                        |
  | pos_embed                    | embeddings.position_embeddings              |
  | patch_embed.proj.{weight,bias} | embeddings.patch_embeddings.projection.*  |
  | blocks.N.norm1.*             | layers.N.layernorm_before.*                 |
  | blocks.N.attn.qkv.{weight,bias} | layers.N.attention.{q,k,v}_proj.* (rows split in thirds) |
  | blocks.N.attn.proj.*         | layers.N.attention.o_proj.*                 |
  | blocks.N.norm2.*             | layers.N.layernorm_after.*                  |
  | blocks.N.mlp.fc1.* / fc2.*   | layers.N.mlp.fc1.* / fc2.*                  |
  | norm.*                       | layernorm.*                                 |

Classifier heads (`classifier.`, `pooler.`, `head.`, `head_dist.`, `fc_norm.`) and the
masked-image-modelling `embeddings.mask_token` are ignored. The final `layernorm` may be
absent (timm models pooled by `fc_norm`): it only feeds the unused "embedding". The FPN
adapters (`fpn1`..`fpn4`) are new modules and keep their initialisation.
"""

import logging
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from convert_weights import keymap
from convert_weights.clip_sources import CheckpointError
from convert_weights.clip_sources import read_state_dict
from mtaclip_jax.models.backbones import vit_imagenet
from mtaclip_jax.models.clip import vit

log = logging.getLogger(__name__)

_IGNORED = ("classifier.", "pooler.", "head.", "head_dist.", "fc_norm.", "embeddings.mask_token")
# transformers' conversion_mapping for "ViTModel" (hub names -> current), in order.
_HUB_NAMES = [
    ("encoder.layer.", "layers."),
    ("attention.query", "q_proj"),
    ("attention.key", "k_proj"),
    ("attention.value", "v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
]
_TIMM_NAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.mlp\.", r"layers.\1.mlp."),
    (r"^norm\.", "layernorm."),
]
_TIMM_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def is_timm(state: Mapping[str, Any]) -> bool:
  return "patch_embed.proj.weight" in state or "cls_token" in state


def is_vit(state: Mapping[str, Any]) -> bool:
  """Whether a state dict's keys are an ImageNet ViT's (transformers or timm names)."""
  keys = {k[len("vit.") :] if k.startswith("vit.") else k for k in state}
  return is_timm(keys) or "embeddings.patch_embeddings.projection.weight" in keys


def _timm_to_current(state: Mapping[str, Any]) -> Dict[str, Any]:
  out = {}
  for key, value in state.items():
    m = _TIMM_QKV.match(key)
    if m:
      value = np.asarray(value)
      if value.shape[0] % 3:
        raise CheckpointError(
            f"timm key {key!r}: shape {value.shape}, expected " f"3 * hidden rows (packed q, k, v)"
        )
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3)):
        out[f"layers.{m.group(1)}.attention.{name}.{m.group(2)}"] = part
      continue
    for pattern, repl in _TIMM_NAMES:
      key, n = re.subn(pattern, repl, key)
      if n:
        break
    out[key] = value
  return out


def vit_keys(state: Mapping[str, Any]) -> Dict[str, Any]:
  """HF (current or hub names) or timm keys -> transformers 5 `ViTModel` names, heads
  dropped."""
  state = {k[len("vit.") :] if k.startswith("vit.") else k: v for k, v in state.items()}
  if is_timm(state):
    state = _timm_to_current(state)
  out = {}
  for key, value in state.items():
    if key.startswith(_IGNORED):
      continue
    if key.startswith("encoder.layer."):
      for old, new in _HUB_NAMES:
        key = key.replace(old, new)
    out[key] = value
  return out


def infer_arch(state: Mapping[str, Any]) -> Optional[str]:
  """The vit_imagenet.ARCHS name whose shapes match current-named keys, or None."""
  try:
    patch = np.shape(state["embeddings.patch_embeddings.projection.weight"])
    positions = np.shape(state["embeddings.position_embeddings"])[-2]
    found = dict(
        hidden_size=patch[0],
        patch_size=patch[-1],
        num_layers=len({k.split(".")[1] for k in state if k.startswith("layers.")}),
        intermediate_size=np.shape(state["layers.0.mlp.fc1.weight"])[0],
    )
  except KeyError:
    return None
  for name, arch in vit_imagenet.ARCHS.items():
    grid = arch.image_size // arch.patch_size
    if positions == grid * grid + 1 and all(getattr(arch, f) == v for f, v in found.items()):
      return name
  return None


def _optional(path) -> bool:
  return path[0] in vit.ADAPTERS or path[0] == "layernorm"


def convert_vit(src, arch: Optional[str] = None) -> Dict:
  """ViT checkpoint (path, or a loaded state dict of tensors / numpy arrays; any format
  `read_state_dict` reads) -> float32 numpy params of `ImageNetViT(ARCHS[arch])`
  without the FPN adapters. `arch` None: inferred from the shapes."""
  state = vit_keys(read_state_dict(src))
  found = infer_arch(state)
  name = arch or found
  if name is None:
    raise CheckpointError(
        f"no ImageNet ViT arch matches this state dict (known: "
        f"{sorted(vit_imagenet.ARCHS)}); first keys: {list(state)[:6]}"
    )
  if name not in vit_imagenet.ARCHS:
    raise CheckpointError(
        f"unknown ImageNet ViT arch {name!r}; known: " f"{sorted(vit_imagenet.ARCHS)}"
    )
  expected = keymap.expected_shapes(vit_imagenet.ImageNetViT(vit_imagenet.ARCHS[name]))
  hints = (
      [f"its shapes match {found!r}: pass arch={found!r}"]
      if found is not None and found != name
      else []
  )
  params = keymap.to_params(
      state,
      expected,
      f"checkpoint does not match ViT arch " f"{name!r}:",
      optional=_optional,
      hints=hints,
  )
  log.info("converted ImageNet ViT %s: %d tensors", name, len(state))
  return params
