"""The assignment on the host: scipy's linear_sum_assignment (float64) through one
`jax.pure_callback` for all layers and images of a step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

# Stands in for NaN/inf costs (as transformers' matcher does with the dtype's max),
# small enough that scipy's sums of costs stay finite.
_HUGE = 1e30


def assign_on_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """scipy assignment for costs [N, B, Q, T], valid [B, T] -> [N, B, T] int32."""
  cost = np.asarray(cost)
  valid = np.asarray(valid)
  n, b, _, t = cost.shape
  out = np.full((n, b, t), -1, dtype=np.int32)
  for j in range(b):
    cols = np.flatnonzero(valid[j])
    if cols.size == 0:
      continue
    # All layers of an image at once (the host's time is the GPU's idle time:
    # 2.7 -> 1.6 ms for [10, 16, 100, 64] with 8 valid targets per image).
    # A NaN/inf pair is only taken when nothing else fits.
    c = np.nan_to_num(
        cost[:, j][:, :, cols].astype(np.float64), nan=_HUGE, posinf=_HUGE, neginf=_HUGE
    )
    for i in range(n):
      rows, tgt = linear_sum_assignment(c[i])
      out[i, j, cols[tgt]] = rows
  return out


def assign(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """One host callback for costs [N, B, Q, T] -> [N, B, T] int32."""
  n, b, _, t = cost.shape
  return jax.pure_callback(
      assign_on_host,
      jax.ShapeDtypeStruct((n, b, t), jnp.int32),
      jax.lax.stop_gradient(cost),
      valid,
      vmap_method="sequential",
  )


# Largest per-device callback operand (bytes) used with several fake CPU devices:
# there, a pure_callback on an operand over ~100 kB per device followed by a
# cross-device reduction deadlocked XLA:CPU's collective rendezvous (jax 0.10.2,
# 8 fake devices: L=9 x 100 x 30 float32 hung, L=8 ran).
_CPU_CALLBACK_BYTES = 64 * 1024


def assign_in_chunks(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """`assign` in several callbacks of at most _CPU_CALLBACK_BYTES each."""
  n, b, q, t = cost.shape
  layers = max(1, _CPU_CALLBACK_BYTES // (q * t * cost.dtype.itemsize))
  if n * b <= layers:
    return assign(cost, valid)
  per_image = [
      jnp.concatenate(
          [assign(cost[i : i + layers, j : j + 1], valid[j : j + 1]) for i in range(0, n, layers)],
          axis=0,
      )
      for j in range(b)
  ]
  return jnp.concatenate(per_image, axis=1)
