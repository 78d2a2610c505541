"""MTA-CLIP, ade20k, CLIP RN50 (paper row). Variants: see mtaclip_jax/config_lib.py.

  python -m mtaclip_jax.main --config configs/ade20k_r50.py --workdir DIR
  python -m mtaclip_jax.main --config configs/ade20k_r50.py:baseline --workdir DIR
"""

from mtaclip_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("ade20k", "RN50", arg)
