"""MTA-CLIP, cityscapes, CLIP RN50 (paper row). Variants: mtaclip_jax/config/variants.py; recipe: docs/RECIPES.md.

python -m mtaclip_jax.main --config configs/cityscapes_r50.py --workdir DIR
python -m mtaclip_jax.main --config configs/cityscapes_r50.py:baseline --workdir DIR
"""

from mtaclip_jax.config import recipes


def get_config(arg=None):
  return recipes.paper_config("cityscapes", "RN50", arg)
