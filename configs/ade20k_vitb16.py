"""MTA-CLIP, ade20k, CLIP ViT-B/16 (paper row). Variants: mtaclip_jax/config/variants.py; recipe: docs/RECIPES.md.

python -m mtaclip_jax.main --config configs/ade20k_vitb16.py --workdir DIR
python -m mtaclip_jax.main --config configs/ade20k_vitb16.py:baseline --workdir DIR
"""

from mtaclip_jax.config import recipes


def get_config(arg=None):
  return recipes.paper_config("ade20k", "ViT-B/16", arg)
