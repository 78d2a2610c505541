"""MTA-CLIP, ade20k, CLIP ViT-B/16 (paper row). Variants: see mtaclip_jax/config_lib.py.

  python -m mtaclip_jax.main --config configs/ade20k_vitb16.py --workdir DIR
  python -m mtaclip_jax.main --config configs/ade20k_vitb16.py:baseline --workdir DIR
"""

from mtaclip_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("ade20k", "ViT-B/16", arg)
