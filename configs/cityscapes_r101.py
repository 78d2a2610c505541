"""MTA-CLIP, cityscapes, CLIP RN101 (paper row). Variants: see mtaclip_jax/config_lib.py.

  python -m mtaclip_jax.main --config configs/cityscapes_r101.py --workdir DIR
  python -m mtaclip_jax.main --config configs/cityscapes_r101.py:baseline --workdir DIR
"""

from mtaclip_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("cityscapes", "RN101", arg)
