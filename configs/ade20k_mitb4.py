"""MTA-CLIP, ade20k, ImageNet MiT-B4 (paper Tab. 3). Variants: mtaclip_jax/config/variants.py; recipe: docs/RECIPES.md.

The text side is CLIP ViT-B/16's text tower (as in the authors' released code,
docs/RECIPES.md; `config.model.text_encoder`).
Weights: `config.init.backbone` (a `python -m convert_weights --arch MiT-B4` folder) and
`config.init.clip` (a converted CLIP ViT-B/16 folder: its text tower).

  python -m mtaclip_jax.main --config configs/ade20k_mitb4.py --workdir DIR
  python -m mtaclip_jax.main --config configs/ade20k_mitb4.py:baseline --workdir DIR
"""

from mtaclip_jax.config import recipes


def get_config(arg=None):
  return recipes.paper_config("ade20k", "MiT-B4", arg)
