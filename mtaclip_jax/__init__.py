"""MTA-CLIP semantic segmentation in JAX/Flax."""

from mtaclip_jax import xla_cpu as _xla_cpu

_xla_cpu.apply()
