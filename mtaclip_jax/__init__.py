"""MTA-CLIP semantic segmentation in JAX/Flax."""
