"""Weight conversion from PyTorch checkpoints to mtaclip_jax variables.

CLIP: `convert_clip(src, arch=None, allow_torchscript=False)` -> {"image", "text"};
CLI: `python -m convert_weights --src PATH --out DIR [--arch ARCH] [--allow-torchscript]`;
`load_converted(DIR)` -> (meta, towers); `merge_into(init_variables, converted)`.
"""
from convert_weights.clip_convert import (convert_clip, convert_state_dict, infer_arch,
                                          merge_into)
from convert_weights.clip_io import load_converted, save_converted
from convert_weights.clip_sources import CheckpointError, read_state_dict

__all__ = ["CheckpointError", "convert_clip", "convert_state_dict", "infer_arch",
           "load_converted", "merge_into", "read_state_dict", "save_converted"]
