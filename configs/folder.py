"""MTA-CLIP on your own folder dataset (docs/DATA.md, "Your own data"): the paper recipe
with the backbone, crop and schedule of its arg; recipe and arg grammar:
mtaclip_jax/config/folder_recipe.py, docs/RECIPES.md.

python -m mtaclip_jax.main --config configs/folder.py:root=DIR --workdir WD \
    --config.init.clip=clip_rn50
python -m mtaclip_jax.main --config configs/folder.py:root=DIR,backbone=tiny,crop=128,steps=300 \
    --workdir WD
"""

from mtaclip_jax.config import folder_recipe


def get_config(arg=None):
  return folder_recipe.folder_config(arg)
