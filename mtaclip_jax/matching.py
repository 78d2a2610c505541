"""Hungarian matching between mask-query predictions and ground-truth segments.

Costs are computed on device, vectorised over the supervised layers L and the
batch B; the assignment itself runs on the host (scipy's linear_sum_assignment)
through one `jax.pure_callback` per step, inside `jax.shard_map` over the "data"
mesh axis when a mesh is active (a callback in a sharded jit without shard_map
hangs on fake CPU devices, see NOTES.md), or with config.loss.matcher="device" on
the device (hungarian_device.py), also per device in `shard_map`.

Points are (x, y) in [0, 1]^2 with `grid_sample(align_corners=False)` semantics:
pixel centre i of a length-n axis sits at (i + 0.5) / n; outside the image the
value is 0 (padding_mode="zeros"), as in Mask2Former's `point_sample`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from scipy.optimize import linear_sum_assignment

from mtaclip_jax import hungarian_device

DATA_AXIS = "data"
# config.loss.matcher: scipy through a host callback, or hungarian_device.py in XLA.
MATCHERS = ("host", "device")
# Stands in for NaN/inf costs (as transformers' matcher does with the dtype's max),
# small enough that scipy's sums of costs stay finite.
_HUGE = 1e30


def bilinear_taps(points: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Flat indices and weights of the 4 bilinear taps of each point.

    Args:
        points: [..., 2] (x, y) in [0, 1].
        height, width: size of the sampled map.

    Returns:
        (indices [..., 4] int32 into the flattened map, weights [..., 4]); taps outside
        the map get weight 0 (zero padding) and a clipped, harmless index.
    """
    x = points[..., 0] * width - 0.5
    y = points[..., 1] * height - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)
    ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
    wx = jnp.stack([1 - fx, fx, 1 - fx, fx], axis=-1)
    wy = jnp.stack([1 - fy, 1 - fy, fy, fy], axis=-1)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    weights = jnp.where(inside, wx * wy, 0.0)
    indices = jnp.clip(ys, 0, height - 1) * width + jnp.clip(xs, 0, width - 1)
    return indices, weights


def point_sample(maps: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinearly samples maps at points (torch grid_sample, align_corners=False).

    Args:
        maps: [..., M, H, W] (any dtype; uint8 target masks are gathered as uint8).
        points: [..., P, 2] (x, y) in [0, 1]; leading dims broadcast against maps'
            leading dims (the M maps of a row share that row's points).

    Returns:
        [..., M, P] float32.
    """
    return jnp.swapaxes(point_sample_rows(maps, points), -1, -2)


def point_sample_rows(maps: jax.Array, points: jax.Array) -> jax.Array:
    """`point_sample`, transposed: returns [..., P, M].

    Gathers whole pixel rows of the [H*W, M] transposed maps, one gather per
    bilinear tap; this layout also keeps the following matmuls over P fast
    (XLA:CPU ran the [M, P] layout 4x slower once fused with the cost matmuls).
    """
    *_, m, h, w = maps.shape
    lead = jnp.broadcast_shapes(maps.shape[:-3], points.shape[:-2])
    p = points.shape[-2]
    rows = jnp.swapaxes(jnp.broadcast_to(maps, lead + (m, h, w)).reshape(-1, m, h * w), 1, 2)
    indices, weights = bilinear_taps(points, h, w)  # [..., P, 4]
    indices = jnp.broadcast_to(indices, lead + (p, 4)).reshape(-1, p, 4)
    weights = jnp.broadcast_to(weights, lead + (p, 4)).reshape(-1, p, 4).astype(jnp.float32)

    def sample(r, i, wt):  # r [HW, M], i [P, 4], wt [P, 4]
        out = 0.0
        for c in range(4):
            out = out + r[i[:, c]].astype(jnp.float32) * wt[:, c:c + 1]
        return out

    return jax.vmap(sample)(rows, indices, weights).reshape(lead + (p, m))


def pairwise_mask_costs(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Point-mean sigmoid BCE and dice of every (prediction, target) pair.

    As transformers' `pair_wise_sigmoid_cross_entropy_loss` / `pair_wise_dice_loss`,
    on points-major samples: pred [..., P, Q] logits, target [..., P, T] in [0, 1]
    -> ([..., Q, T], [..., Q, T]). BCE(x, y) = softplus(x) - x y, so the BCE cost
    needs a single matmul with the logits.

    The two matmuls run at Precision.HIGH: float32 on CPU, TF32 on GPUs, 3 bf16
    passes on TPUs. At HIGHEST they were the largest cuBLAS calls of the train step
    on an H200 (2 x 3.5 ms per step at batch 16, session 7). TF32's rounding of the
    inputs moved the costs by at most 5.6e-6 of their largest and changed none of 160
    assignments (emulated on CPU, 20 images of 8 blob targets, docs/BENCHMARKS.md).
    """
    num_points = pred.shape[-2]
    probs = jax.nn.sigmoid(pred)
    hi = jax.lax.Precision.HIGH
    xy = jnp.einsum("...pq,...pt->...qt", pred, target, precision=hi)
    py = jnp.einsum("...pq,...pt->...qt", probs, target, precision=hi)
    bce = (jnp.sum(jax.nn.softplus(pred), axis=-2)[..., :, None] - xy) / num_points
    denominator = jnp.sum(probs, -2)[..., :, None] + jnp.sum(target, -2)[..., None, :]
    dice = 1.0 - (2.0 * py + 1.0) / (denominator + 1.0)
    return bce, dice


def match_costs(logits: jax.Array, masks: jax.Array, target_masks: jax.Array,
                target_classes: jax.Array, points: jax.Array, *,
                class_weight: float = 2.0, mask_weight: float = 5.0,
                dice_weight: float = 5.0) -> jax.Array:
    """Matching cost of every (query, target) pair, for every layer and image.

    Args:
        logits: [L, B, Q, C+1] class logits.
        masks: [L, B, Q, h, w] mask logits (stride 4).
        target_masks: [B, T, H, W] binary masks (full resolution, any dtype).
        target_classes: [B, T] int; entries of invalid targets may hold anything.
        points: [L, B, P, 2] uniform points, shared by all pairs of an image.

    Returns:
        [L, B, Q, T] float32 cost = class_weight * (-p[class]) + mask_weight * BCE +
        dice_weight * dice (the cost of invalid targets is meaningless: mask it).
    """
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    masks = jax.lax.stop_gradient(masks)
    num_labels = logits.shape[-1]
    classes = jnp.clip(target_classes, 0, num_labels - 1)
    probs = jax.nn.softmax(logits, axis=-1)  # [L, B, Q, C+1]
    index = jnp.broadcast_to(classes[None, :, None, :],
                             probs.shape[:-1] + classes.shape[-1:])
    cost_class = -jnp.take_along_axis(probs, index, axis=-1)  # [L, B, Q, T]

    def layer_mask_costs(xs):
        masks_l, points_l = xs
        pred = point_sample_rows(masks_l, points_l)  # [B, P, Q]
        target = point_sample_rows(target_masks, points_l)  # [B, P, T]
        bce, dice = pairwise_mask_costs(pred, target)
        return mask_weight * bce + dice_weight * dice

    # One layer at a time: the sampled taps of all layers at once take GBs.
    return class_weight * cost_class + jax.lax.map(layer_mask_costs, (masks, points))


def _assign_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
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
        c = np.nan_to_num(cost[:, j][:, :, cols].astype(np.float64),
                          nan=_HUGE, posinf=_HUGE, neginf=_HUGE)
        for i in range(n):
            rows, tgt = linear_sum_assignment(c[i])
            out[i, j, cols[tgt]] = rows
    return out


def _assign(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """One host callback for costs [N, B, Q, T] -> [N, B, T] int32."""
    n, b, _, t = cost.shape
    return jax.pure_callback(
        _assign_host, jax.ShapeDtypeStruct((n, b, t), jnp.int32),
        jax.lax.stop_gradient(cost), valid, vmap_method="sequential")


# Largest per-device callback operand (bytes) used with several fake CPU devices:
# there, a pure_callback on an operand over ~100 kB per device followed by a
# cross-device reduction deadlocked XLA:CPU's collective rendezvous (jax 0.10.2,
# 8 fake devices: L=9 x 100 x 30 float32 hung, L=8 ran).
_CPU_CALLBACK_BYTES = 64 * 1024


def _assign_in_chunks(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """`_assign` in several callbacks of at most _CPU_CALLBACK_BYTES each."""
    n, b, q, t = cost.shape
    layers = max(1, _CPU_CALLBACK_BYTES // (q * t * cost.dtype.itemsize))
    if n * b <= layers:
        return _assign(cost, valid)
    per_image = [jnp.concatenate([_assign(cost[i:i + layers, j:j + 1], valid[j:j + 1])
                                  for i in range(0, n, layers)], axis=0)
                 for j in range(b)]
    return jnp.concatenate(per_image, axis=1)


def data_mesh(mesh=None):
    """The mesh to shard the callback over, or None (no mesh / no "data" axis)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or DATA_AXIS not in mesh.axis_names:
        return None
    return mesh


def hungarian_match(cost: jax.Array, valid: jax.Array, mesh=None,
                    matcher: str = "host") -> jax.Array:
    """Minimum-cost matching of queries to targets, per image (and per leading index).

    Args:
        cost: [..., B, Q, T] cost of assigning query q to target t.
        valid: [B, T] bool; invalid (padding) targets are never matched.
        mesh: mesh whose "data" axis shards B; default: the current mesh
            (`jax.set_mesh`). Without a mesh (or without a "data" axis) the matcher
            runs directly, else per device in `shard_map`.
        matcher: "host" (scipy's linear_sum_assignment in float64 through one
            callback) or "device" (the same algorithm in XLA, float32:
            hungarian_device.py).

    Returns:
        [..., B, T] int32: the query matched to each target, -1 for invalid targets.
    """
    *lead, b, q, t = cost.shape
    if t > q:
        raise ValueError(
            f"hungarian_match: {t} target slots (config.data.max_segments) exceed "
            f"{q} queries (config.model.num_queries); every target must get a query.")
    if valid.shape != (b, t):
        raise ValueError(f"hungarian_match: valid has shape {valid.shape}, expected {(b, t)}.")
    if matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {matcher!r} (config.loss.matcher); expected one "
                         f"of {', '.join(MATCHERS)}.")
    cost = jnp.reshape(jax.lax.stop_gradient(cost).astype(jnp.float32), (-1, b, q, t))
    valid = valid.astype(bool)
    mesh = data_mesh(mesh)
    if matcher == "device":
        assign = hungarian_device.assign
    elif mesh is not None and jax.default_backend() == "cpu" and mesh.size > 1:
        assign = _assign_in_chunks
    else:
        assign = _assign
    if mesh is None:
        out = assign(cost, valid)
    else:
        out = jax.shard_map(
            assign, mesh=mesh, in_specs=(P(None, DATA_AXIS), P(DATA_AXIS)),
            out_specs=P(None, DATA_AXIS), check_vma=False)(cost, valid)
    return out.reshape(*lead, b, t)


def sample_match_points(rng: jax.Array, num_layers: int, batch: int,
                        num_points: int) -> jax.Array:
    """Uniform points [L, B, P, 2] for the matching costs."""
    return jax.random.uniform(rng, (num_layers, batch, num_points, 2), jnp.float32)


def match(outputs: dict, batch: dict, points: jax.Array, loss_config, mesh=None) -> jax.Array:
    """Matches every supervised layer of `outputs` to `batch`'s segments.

    Returns [L, B, T] int32 (query per target, -1 for invalid targets).
    """
    cost = match_costs(
        outputs["logits"], outputs["masks"], batch["masks"], batch["classes"], points,
        class_weight=loss_config.class_weight, mask_weight=loss_config.mask_weight,
        dice_weight=loss_config.dice_weight)
    return hungarian_match(cost, batch["valid"], mesh=mesh,
                           matcher=getattr(loss_config, "matcher", "host"))
