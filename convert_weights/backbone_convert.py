"""Which converter a checkpoint needs: CLIP, ImageNet ViT (vit_hf) or SegFormer MiT
(segformer_hf), from `--arch` (a name in the backbone registry) or from its keys.

`convert_any(state, arch=None) -> (arch name, towers)`: CLIP gives {"image", "text"},
the others {"image": {"params"}}, the layout `save_converted` writes and
`config.init.clip` / `config.init.backbone` read.
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

from convert_weights.clip_convert import convert_state_dict
from convert_weights.clip_sources import CheckpointError
from convert_weights.segformer_hf import convert_segformer
from convert_weights.segformer_hf import infer_arch as infer_mit
from convert_weights.segformer_hf import segformer_keys
from convert_weights.vit_hf import convert_vit
from convert_weights.vit_hf import infer_arch as infer_vit
from convert_weights.vit_hf import is_vit
from convert_weights.vit_hf import vit_keys
from mtaclip_jax.models import backbones
from mtaclip_jax.models import clip
from mtaclip_jax.models.backbones import mit
from mtaclip_jax.models.backbones import vit_imagenet

_MIT_KEY = re.compile(r"^(stages\.\d+|encoder\.patch_embeddings\.\d+)\.")


def is_segformer(state: Mapping[str, Any]) -> bool:
  return any(_MIT_KEY.match(k) for k in segformer_keys(state))


_KINDS = {"clip": "CLIP", "vit": "ImageNet ViT", "mit": "SegFormer MiT", None: "unknown"}


def source_kind(state: Mapping[str, Any]) -> Optional[str]:
  """ "vit", "mit", "clip" (OpenAI names; `read_state_dict` renames transformers') or
  None, from the key names."""
  if is_vit(state):
    return "vit"
  if is_segformer(state):
    return "mit"
  if any(k.startswith("visual.") or k == "text_projection" for k in state):
    return "clip"
  return None


def _kind_of_arch(arch: str) -> str:
  if arch in clip.ARCHS:
    return "clip"
  if arch in vit_imagenet.ARCHS:
    return "vit"
  if arch in mit.MIT_ARCHS:
    return "mit"
  raise CheckpointError(f"unknown arch {arch!r}; known: {sorted(backbones.REGISTRY)}")


def _registered(kind: str, found: Optional[str]) -> str:
  """The inferred arch, which must be a registered backbone."""
  if found is None or found not in backbones.REGISTRY:
    known = sorted(n for n in backbones.REGISTRY if _kind_of_arch(n) == kind)
    what = f"{found} weights" if found else "weights of no known arch"
    raise CheckpointError(
        f"this {_KINDS[kind]} checkpoint holds {what}; registered "
        f"{_KINDS[kind]} backbones: {known} (pass --arch, or add a "
        f"backbone: docs/BACKBONES.md)"
    )
  return found


def convert_any(
    state: Mapping[str, Any], arch: Optional[str] = None
) -> Tuple[str, Dict[str, Dict]]:
  """A read state dict (`read_state_dict`) -> (arch name, towers). With `arch`, a
  state dict of another architecture fails in that arch's converter, naming the keys
  that do not fit."""
  found_kind = source_kind(state)
  kind = (found_kind or "clip") if arch is None else _kind_of_arch(arch)
  if arch is not None and found_kind not in (None, kind):
    raise CheckpointError(
        f"arch {arch!r} needs {_KINDS[kind]} weights, but the "
        f"keys are {_KINDS[found_kind]} names (e.g. "
        f"{list(state)[:3]}); drop --arch to convert it as such"
    )
  if kind == "clip":
    found, towers = convert_state_dict(state, arch)
    return found.name, towers
  if kind == "vit":
    name = arch or _registered("vit", infer_vit(vit_keys(state)))
    return name, {"image": {"params": convert_vit(state, name)}}
  name = arch or _registered("mit", infer_mit(segformer_keys(state)))
  return name, {"image": {"params": convert_segformer(state, name)}}
