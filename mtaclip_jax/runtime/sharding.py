"""Device mesh and shardings (docs/SCALING.md).

Mesh axes ("data", "model"). The batch is split over "data". Parameters are
replicated unless `mesh.fsdp` is set: then every parameter of at least
`mesh.fsdp_min_size` elements is split over "data" along its largest dimension that
the axis divides (ZeRO-3 / FSDP style; XLA inserts the all-gathers). `mesh.rules`
([regex, "dim0,dim1,..."] pairs, e.g. ["decoder/.*mlp.*/kernel", "None,model"]) put
chosen parameters on the "model" axis. Shardings are computed from `jax.eval_shape`
of the init: no parameter is ever materialised on one device first.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from mtaclip_jax import errors


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  model = int(cfg.get("model", 1))
  data = int(cfg.get("data", -1))
  if model < 1 or n % model:
    raise errors.MeshConfigError(
        f"config.mesh.model={model} must divide the number of devices ({n})"
    )
  if data == -1:
    data = n // model
  if data * model != n:
    raise errors.MeshConfigError(
        f"config.mesh.data={data} x config.mesh.model={model} = {data * model} devices, "
        f"but {n} are available; set config.mesh.data=-1 to use all of them"
    )
  return jax.make_mesh(
      (data, model),
      ("data", "model"),
      devices=devices,
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )


def _parse_spec(text: str) -> tuple:
  parts = []
  for p in text.split(","):
    p = p.strip()
    parts.append(None if p in ("", "None", "none") else p)
  return tuple(parts)


def param_spec(path: str, shape: tuple[int, ...], cfg: ml_collections.ConfigDict, mesh: Mesh) -> P:
  for pattern, spec in cfg.get("rules", []) or []:
    if re.search(pattern, path):
      dims = _parse_spec(spec)
      if len(dims) != len(shape):
        raise errors.MeshConfigError(
            f"config.mesh.rules: spec {spec!r} has {len(dims)} dims but parameter "
            f"{path} has shape {shape}"
        )
      for d, size in zip(dims, shape):
        if d is not None and size % mesh.shape[d]:
          raise errors.MeshConfigError(
              f"config.mesh.rules: {path} dim of size {size} is not "
              f"divisible by mesh axis {d!r} ({mesh.shape[d]})"
          )
      return P(*dims)
  n = mesh.shape["data"]
  if cfg.get("fsdp", False) and n > 1 and int(np.prod(shape)) >= cfg.get("fsdp_min_size", 0):
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
      if shape[dim] % n == 0:
        spec = [None] * len(shape)
        spec[dim] = "data"
        return P(*spec)
  return P()


def _path_str(key_path) -> str:
  parts = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_shardings(abstract_tree: Any, cfg: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  """NamedShardings for any pytree of ShapeDtypeStructs (params, optimizer state).

  A leaf is sharded like the parameter whose path its own path ends with (optimizer
  moments of a parameter share its layout); scalars and unmatched leaves replicate.
  """

  def one(key_path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape:
      return NamedSharding(mesh, P())
    flat_keys = [
        str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey) and "/" in str(k.key)
    ]
    if flat_keys:  # a leaf of a flat {"a/b/c": array} dict (optimizer state)
      path = flat_keys[-1]
    else:
      path = _path_str(key_path)
      for prefix in ("params/", "batch_stats/"):
        i = path.find(prefix)
        if i >= 0:
          path = path[i + len(prefix) :]
    return NamedSharding(mesh, param_spec(path, shape, cfg, mesh))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def restore_target(abstract_tree: Any, shardings: Any) -> Any:
  """`abstract_tree`'s shapes and dtypes with `shardings`: what a checkpoint restore
  reads the arrays straight into, resharding them for this mesh."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, batch_size: int) -> list[int]:
  """The rows of a global batch of `batch_size` that this process's devices hold: the
  rows its data pipeline loads (data/pipeline.py), in order."""
  index = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  rows = set()
  for (rows_slice,) in index.values():
    rows.update(range(*rows_slice.indices(batch_size)))
  return sorted(rows)


def global_batch(
    local: dict[str, np.ndarray], mesh: Mesh, batch_size: int | None = None
) -> dict[str, jax.Array]:
  """This process's rows of a batch (`process_rows`) -> global arrays sharded over
  "data" (multi-host safe). `batch_size`: the global batch (else inferred from the
  rows of one process and the mesh)."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in local.items():
    v = np.asarray(v) if not isinstance(v, (str, bytes)) else None
    if v is None or v.dtype == object:
      continue
    shape = None if batch_size is None else (int(batch_size),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
  return out
