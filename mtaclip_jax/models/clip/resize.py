"""Bicubic resizing of positional-embedding grids, identical to PyTorch's
`F.interpolate(mode="bicubic", align_corners=False)` (Keys kernel with a=-0.75, edge
clamping, no antialiasing), which DenseCLIP-style code uses for CLIP position grids.

`jax.image.resize(method="bicubic")` uses a=-0.5 and antialiasing, so it would not
reproduce PyTorch-trained models; here the resize is a pair of small interpolation
matrices built on the host (shapes are static).
"""

import functools

import jax.numpy as jnp
import numpy as np

_A = -0.75


def _cubic1(x):
  return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cubic2(x):
  return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 matrix M with resize(v) = M @ v along one axis."""
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    idx = int(np.floor(src))
    t = src - idx
    weights = (_cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t))
    for k, w in enumerate(weights):
      m[i, min(max(idx - 1 + k, 0), in_size - 1)] += w
  return m.astype(np.float32)


def resize_grid(grid, out_hw):
  """Bicubic resize of [h, w, C] to [out_h, out_w, C] (identity when sizes match)."""
  h, w, _ = grid.shape
  oh, ow = out_hw
  if (h, w) == (oh, ow):
    return grid
  mh = jnp.asarray(bicubic_matrix(h, oh))
  mw = jnp.asarray(bicubic_matrix(w, ow))
  grid = grid.astype(jnp.float32)
  return jnp.einsum("oh,pw,hwc->opc", mh, mw, grid, precision="highest")


def resize_positional_embedding(pos, grid_hw, out_hw):
  """pos [1 + h*w, C] (class/mean token first) -> [1 + out_h*out_w, C]."""
  if tuple(grid_hw) == tuple(out_hw):
    return pos
  cls, spatial = pos[:1], pos[1:]
  spatial = resize_grid(spatial.reshape(grid_hw[0], grid_hw[1], -1), out_hw)
  return jnp.concatenate(
      [cls.astype(spatial.dtype), spatial.reshape(out_hw[0] * out_hw[1], -1)], axis=0
  )
