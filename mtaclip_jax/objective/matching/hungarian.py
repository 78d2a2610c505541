"""Hungarian matching between mask-query predictions and ground-truth segments: the
one entry (`match`, `hungarian_match`) over two solvers of the same assignment.

Costs come from costs.py. The assignment runs on the host (host.py: scipy through
one `jax.pure_callback` per step, config.loss.matcher="host") or on the device
(device.py: the same algorithm in XLA, "device"); with a mesh, per device inside
`jax.shard_map` over the "data" axis (a callback in a sharded jit without
shard_map hangs on fake CPU devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mtaclip_jax.objective.matching import costs
from mtaclip_jax.objective.matching import device
from mtaclip_jax.objective.matching import host

DATA_AXIS = "data"
# config.loss.matcher: scipy through a host callback, or device.py in XLA.
MATCHERS = ("host", "device")


def data_mesh(mesh=None):
  """The mesh to shard the callback over, or None (no mesh / no "data" axis)."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or DATA_AXIS not in mesh.axis_names:
    return None
  return mesh


def hungarian_match(
    cost: jax.Array, valid: jax.Array, mesh=None, matcher: str = "host"
) -> jax.Array:
  """Minimum-cost matching of queries to targets, per image (and per leading index).

  Args:
      cost: [..., B, Q, T] cost of assigning query q to target t.
      valid: [B, T] bool; invalid (padding) targets are never matched.
      mesh: mesh whose "data" axis shards B; default: the current mesh
          (`jax.set_mesh`). Without a mesh (or without a "data" axis) the matcher
          runs directly, else per device in `shard_map`.
      matcher: "host" (scipy's linear_sum_assignment in float64 through one
          callback) or "device" (the same algorithm in XLA, float32:
          device.py).

  Returns:
      [..., B, T] int32: the query matched to each target, -1 for invalid targets.
  """
  *lead, b, q, t = cost.shape
  # config/validate.py refuses config.data.max_segments > config.model.num_queries
  # and an unknown config.loss.matcher before a run starts.
  assert t <= q, f"{t} target slots exceed {q} queries: every target must get a query"
  assert valid.shape == (b, t), (valid.shape, (b, t))
  assert matcher in MATCHERS, matcher
  cost = jnp.reshape(jax.lax.stop_gradient(cost).astype(jnp.float32), (-1, b, q, t))
  valid = valid.astype(bool)
  mesh = data_mesh(mesh)
  if matcher == "device":
    assign = device.assign
  elif mesh is not None and jax.default_backend() == "cpu" and mesh.size > 1:
    assign = host.assign_in_chunks
  else:
    assign = host.assign
  if mesh is None:
    out = assign(cost, valid)
  else:
    out = jax.shard_map(
        assign,
        mesh=mesh,
        in_specs=(P(None, DATA_AXIS), P(DATA_AXIS)),
        out_specs=P(None, DATA_AXIS),
        check_vma=False,
    )(cost, valid)
  return out.reshape(*lead, b, t)


def sample_match_points(rng: jax.Array, num_layers: int, batch: int, num_points: int) -> jax.Array:
  """Uniform points [L, B, P, 2] for the matching costs."""
  return jax.random.uniform(rng, (num_layers, batch, num_points, 2), jnp.float32)


def match(outputs: dict, batch: dict, points: jax.Array, loss_config, mesh=None) -> jax.Array:
  """Matches every supervised layer of `outputs` to `batch`'s segments.

  Returns [L, B, T] int32 (query per target, -1 for invalid targets).
  """
  cost = costs.match_costs(
      outputs["logits"],
      outputs["masks"],
      batch["masks"],
      batch["classes"],
      points,
      class_weight=loss_config.class_weight,
      mask_weight=loss_config.mask_weight,
      dice_weight=loss_config.dice_weight,
  )
  return hungarian_match(
      cost, batch["valid"], mesh=mesh, matcher=getattr(loss_config, "matcher", "host")
  )
