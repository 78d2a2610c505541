"""Weight conversion from PyTorch checkpoints to mtaclip_jax variables.

CLIP: `convert_clip(src, arch=None, allow_torchscript=False)` -> {"image", "text"};
ImageNet ViT: `convert_vit(src, arch=None)` -> params (transformers ViTModel or timm);
SegFormer MiT: `convert_segformer(src, arch="MiT-B4")` -> params;
any of them by key detection: `convert_any(read_state_dict(src), arch=None)`.
CLI: `python -m convert_weights --src PATH --out DIR [--arch ARCH] [--allow-torchscript]`;
`load_converted(DIR)` -> (meta, towers); `merge_into(init_variables, converted)`.
"""

from convert_weights.backbone_convert import convert_any
from convert_weights.clip_convert import convert_clip
from convert_weights.clip_convert import convert_state_dict
from convert_weights.clip_convert import infer_arch
from convert_weights.clip_convert import merge_into
from convert_weights.clip_io import load_converted
from convert_weights.clip_io import save_converted
from convert_weights.clip_sources import CheckpointError
from convert_weights.clip_sources import read_state_dict
from convert_weights.segformer_hf import convert_segformer
from convert_weights.vit_hf import convert_vit

__all__ = [
    "CheckpointError",
    "convert_any",
    "convert_clip",
    "convert_segformer",
    "convert_state_dict",
    "convert_vit",
    "infer_arch",
    "load_converted",
    "merge_into",
    "read_state_dict",
    "save_converted",
]
