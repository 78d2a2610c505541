"""Exact minimum-cost assignment on the device (no host callback).

The shortest-augmenting-path algorithm of Jonker & Volgenant in the form scipy's
`linear_sum_assignment` runs it (Crouse 2016, scipy/optimize/rectangular_lsap): one
Dijkstra search over the queries per target, dual variables on both sides, then an
augmentation along the found path. The loops are `lax.while_loop`s over vectors of
the Q queries, vmapped over layers and images, so the whole matching is one XLA
program: no device-to-host round trip per step, no callback to keep inside
`shard_map`, and a train step that the persistent compilation cache can hold (JAX
never caches a program with a host callback).

Targets are visited in order and, of equally short paths, one ending at a free query
is taken, as in scipy; the order in which other ties are broken differs, so where
several assignments have the same least total the two may return different ones.
The arithmetic is float32 (scipy's float64): assignments whose totals differ by less
than float32's rounding of the duals may also be swapped. Otherwise both return the
same assignment (tests/unit/objective/test_hungarian_device.py).

Work per image: T_valid searches of at most T_valid steps over Q queries, i.e.
O(T_valid^2 Q) (8 targets x 100 queries: ~6k multiply-adds); the loop trips of the
slowest image of a batch set the time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# NaN/inf costs become this (as on the host): only taken when nothing else fits.
_HUGE = 1e30


def _augment_row(state, row, cost, active):
  """Adds target `row` to the assignment of `state` (u, v, col4row, row4col);
  leaves it as it is where `active` is False (the loops stop at once, so a batch
  of images spends no trips on rows invalid in all of them)."""
  u, v, col4row, row4col = state
  t, q = cost.shape
  inf = jnp.array(jnp.inf, cost.dtype)

  def search_open(carry):
    return (carry[6] < 0) & active

  def search_step(carry):
    dist, path, seen_rows, seen_cols, min_val, i, _ = carry
    seen_rows = seen_rows.at[i].set(True)
    reduced = min_val + cost[i] - u[i] - v
    shorter = ~seen_cols & (reduced < dist)
    path = jnp.where(shorter, i, path)
    dist = jnp.where(shorter, reduced, dist)
    open_dist = jnp.where(seen_cols, inf, dist)
    low = jnp.min(open_dist)
    ties = ~seen_cols & (open_dist == low)
    free_ties = ties & (row4col < 0)
    j = jnp.where(jnp.any(free_ties), jnp.argmax(free_ties), jnp.argmax(ties))
    seen_cols = seen_cols.at[j].set(True)
    sink = jnp.where(row4col[j] < 0, j, -1)
    return dist, path, seen_rows, seen_cols, low, row4col[j], sink

  init = (
      jnp.full((q,), inf),
      jnp.full((q,), -1, jnp.int32),
      jnp.zeros((t,), bool),
      jnp.zeros((q,), bool),
      jnp.zeros((), cost.dtype),
      row,
      jnp.array(-1, jnp.int32),
  )
  dist, path, seen_rows, seen_cols, min_val, _, sink = jax.lax.while_loop(
      search_open, search_step, init
  )

  # Duals: the rows and columns reached by the search move by their slack.
  others = seen_rows & (jnp.arange(t) != row)
  u = jnp.where(others, u + min_val - dist[jnp.clip(col4row, 0, q - 1)], u)
  u = u.at[row].add(min_val)
  v = jnp.where(seen_cols, v - (min_val - dist), v)

  def walk_open(carry):
    return ~carry[1] & active

  def walk_step(carry):
    j, _, col4row, row4col = carry
    i = path[j]
    row4col = row4col.at[j].set(i)
    previous = col4row[i]
    col4row = col4row.at[i].set(j)
    return previous, i == row, col4row, row4col

  _, _, col4row, row4col = jax.lax.while_loop(
      walk_open, walk_step, (sink, jnp.array(False), col4row, row4col)
  )
  return u, v, col4row, row4col


def assign_one(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """Minimum-cost assignment of one image's targets to distinct queries.

  Args:
      cost: [T, Q] cost of giving target t query q (T <= Q).
      valid: [T] bool; invalid targets are skipped and get -1.

  Returns:
      [T] int32, the query of each valid target.
  """
  t, q = cost.shape
  if t > q:  # the searches would never find a free query
    raise ValueError(f"assign_one: {t} targets exceed {q} queries")
  cost = jnp.nan_to_num(cost.astype(jnp.float32), nan=_HUGE, posinf=_HUGE, neginf=_HUGE)
  state = (
      jnp.zeros((t,), cost.dtype),
      jnp.zeros((q,), cost.dtype),
      jnp.full((t,), -1, jnp.int32),
      jnp.full((q,), -1, jnp.int32),
  )

  def visit(row, state):
    return _augment_row(state, row, cost, valid[row])

  col4row = jax.lax.fori_loop(0, t, visit, state)[2]
  return jnp.where(valid, col4row, -1)


def assign(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """`assign_one` for costs [N, B, Q, T] (query-major, as costs.py builds them)
  and valid [B, T] -> [N, B, T] int32."""
  per_image = jax.vmap(assign_one, in_axes=(0, 0))
  per_layer = jax.vmap(per_image, in_axes=(0, None))
  return per_layer(jnp.swapaxes(jax.lax.stop_gradient(cost), -1, -2), valid)
