"""MTA-CLIP, ade20k, ImageNet ViT-S/16 (paper Tab. 3). Variants: mtaclip_jax/config/variants.py; recipe: docs/RECIPES.md.

The text side is CLIP ViT-B/16's text tower (as in the authors' released code,
docs/RECIPES.md; `config.model.text_encoder`).
Weights: `config.init.backbone` (a `python -m convert_weights --arch ViT-S/16` folder) and
`config.init.clip` (a converted CLIP ViT-B/16 folder: its text tower).

  python -m mtaclip_jax.main --config configs/ade20k_vits16.py --workdir DIR
  python -m mtaclip_jax.main --config configs/ade20k_vits16.py:baseline --workdir DIR
"""

from mtaclip_jax.config import recipes


def get_config(arg=None):
  return recipes.paper_config("ade20k", "ViT-S/16", arg)
