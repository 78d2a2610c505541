"""Point-sampled mask losses (BCE and dice) of the matched pairs, valid targets only.

Mask2Former samples, for every matched (prediction, target) pair of every supervised
layer, `P * oversample` uniform candidates, keeps the `P * importance` where the
predicted logit is closest to 0 and adds uniform points; BCE and dice are taken on
those P points. Target slots are padded to T = `config.data.max_segments` (64 for
ADE20k) but an image has about 8 segments, so doing that work for every slot wastes
~8x. Here the valid slots are put first and processed in chunks of `chunk` slots in a
`while_loop` whose trip count is the number of chunks that hold a valid slot; padding
slots cost nothing. The loop is not reverse-differentiable, so the function has a
custom VJP: the forward stores each point, its logit and its label, the backward
turns the closed-form derivatives of BCE and dice into a scatter-add into the
(zero-padded) mask logits, chunk by chunk again.

Factored masks: the model's masks are `einsum(mask_embed [L,B,Q,D], mask_features
[B,h,w,D])`. Differentiating the loss through `masks` makes autodiff write a dense
[L, B, Q, h, w] gradient, zero outside the ~8 matched queries of 100, and contract it
twice against the factors (~17 GFLOP per 512x512 image, 10 layers). Given the factors
(`factors=(mask_embed, mask_features)`), the backward instead builds each chunk's
[L, C, h, w] gradient maps of its matched queries only and contracts those: the same
gradients (to rounding) for about a twelfth of the FLOPs; `masks` then gets none.

Draws: given arrays (`draws=(over [L,B,T,Po,2], random [L,B,T,Pr,2])`, the parity
tests) or a key, from which each slot draws with `fold_in(key, global slot id)`, so
the points do not depend on how the batch is split over devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _taps(points: jax.Array, height: int, width: int):
  """Top-left tap in zero-padded coordinates and bilinear fractions of each point
  (grid_sample, align_corners=False): x0 in [-1, w-1] -> padded column x0 + 1."""
  x = points[..., 0] * width - 0.5
  y = points[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  xi = jnp.clip(x0.astype(jnp.int32) + 1, 0, width)
  yi = jnp.clip(y0.astype(jnp.int32) + 1, 0, height)
  return yi, xi, x - x0, y - y0


def sample_padded(padded: jax.Array, maps: jax.Array, points: jax.Array) -> jax.Array:
  """padded [N, h+2, w+2] (zero border), maps [M] map index per row, points
  [M, P, 2] -> [M, P] float32 bilinear samples (one 2x2 patch read per point)."""
  h, w = padded.shape[1] - 2, padded.shape[2] - 2
  yi, xi, fx, fy = _taps(points, h, w)

  def patch(n, y, x):
    return jax.lax.dynamic_slice(padded, (n, y, x), (1, 2, 2))[0]

  per_row = jax.vmap(patch, (None, 0, 0))
  p = jax.vmap(per_row)(maps, yi, xi).astype(jnp.float32)  # [M, P, 2, 2]
  top = p[..., 0, 0] * (1 - fx) + p[..., 0, 1] * fx
  bottom = p[..., 1, 0] * (1 - fx) + p[..., 1, 1] * fx
  return top * (1 - fy) + bottom * fy


def _pad_maps(x: jax.Array) -> jax.Array:
  """[..., h, w] -> [prod(...), h+2, w+2] with a zero border."""
  *lead, h, w = x.shape
  return jnp.pad(x.reshape(-1, h, w), ((0, 0), (1, 1), (1, 1)))


def _bce_dice(logits, labels):
  bce = jnp.mean(jax.nn.softplus(logits) - logits * labels, axis=-1)
  probs = jax.nn.sigmoid(logits)
  dice = 1.0 - (2.0 * jnp.sum(probs * labels, -1) + 1.0) / (
      jnp.sum(probs, -1) + jnp.sum(labels, -1) + 1.0
  )
  return bce, dice


class _Plan:
  """Static shapes and the slot order shared by the forward and backward loops."""

  def __init__(self, masks_shape, valid, chunk):
    self.L, self.B, self.Q, self.h, self.w = masks_shape
    self.T = valid.shape[1]
    n = self.B * self.T
    self.chunk = chunk = max(1, min(chunk, n))
    self.n_pad = -(-n // chunk) * chunk
    flat = valid.reshape(-1)
    order = jnp.argsort(~flat, stable=True).astype(jnp.int32)  # valid slots first
    self.order = jnp.pad(order, (0, self.n_pad - n))
    self.n_valid = jnp.sum(flat.astype(jnp.int32))
    self.trips = (self.n_valid + chunk - 1) // chunk

  def chunk_slots(self, c):
    pos = c * self.chunk + jnp.arange(self.chunk)
    slot = jax.lax.dynamic_slice(self.order, (c * self.chunk,), (self.chunk,))
    return slot, pos < self.n_valid

  def map_index(self, query_index, slot):
    """[L, C] index into the padded [L*B*Q] mask stack of each layer's matched query."""
    b, t = slot // self.T, slot % self.T
    q = query_index[:, b, t]  # [L, C]
    layer = jnp.arange(self.L)[:, None]
    return (layer * self.B + b[None]) * self.Q + q


def _running_count(flags: jax.Array) -> jax.Array:
  """Inclusive running count along axis 1. (`jnp.cumsum` lowers to a reduce-window
  that XLA's cost analysis counts as n^2 additions: 227 GFLOP for [160, 37632].)"""
  return jax.lax.associative_scan(jnp.add, flags.astype(jnp.int32), axis=1)


def smallest_k(values: jax.Array, k: int) -> jax.Array:
  """Indices [R, k] of the k smallest of the non-negative `values` [R, n], ties to the
  lower index, in increasing index order: the set `lax.top_k(-values, k)` picks (the
  losses sum over points, so the order does not matter). Bisection on the float bits
  (monotone for values >= 0) finds the k-th smallest, then one pass takes the indices;
  no sort (XLA:CPU's top-k took 0.39 s of the baseline step, docs/BENCHMARKS.md)."""
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
  rows = values.shape[0]

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid[:, None], axis=1, dtype=jnp.int32) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  kth, _ = jax.lax.fori_loop(
      0, 31, halve, (jnp.zeros(rows, jnp.int32), jnp.full(rows, 2**31 - 1, jnp.int32))
  )
  below = bits < kth[:, None]
  ties = k - jnp.sum(below, axis=1, dtype=jnp.int32, keepdims=True)
  at = bits == kth[:, None]
  take = below | (at & (_running_count(at) <= ties))
  slot = jnp.where(take, _running_count(take) - 1, k)
  index = jnp.broadcast_to(jnp.arange(values.shape[1], dtype=jnp.int32), values.shape)
  return jnp.zeros((rows, k), jnp.int32).at[jnp.arange(rows)[:, None], slot].set(index, mode="drop")


def _draw(key, draws, plan, slot, slot_offset, num_over, num_rand):
  """([L, C, Po, 2], [L, C, Pr, 2]) uniform draws of the chunk's slots."""
  if draws is not None:
    over, rand = draws
    b, t = slot // plan.T, slot % plan.T
    return over[:, b, t], rand[:, b, t]
  keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(slot + slot_offset)
  u = jax.vmap(lambda k: jax.random.uniform(k, (plan.L, num_over + num_rand, 2)))(keys)
  u = jnp.swapaxes(u, 0, 1)  # [L, C, Po + Pr, 2]
  return u[:, :, :num_over], u[:, :, num_over:]


def _forward(
    masks,
    target_masks,
    query_index,
    valid,
    key,
    draws,
    slot_offset,
    *,
    num_over,
    num_uncertain,
    num_rand,
    chunk,
):
  plan = _Plan(masks.shape, valid, chunk)
  L, C, P = plan.L, plan.chunk, num_uncertain + num_rand
  pmasks = _pad_maps(jax.lax.stop_gradient(masks))
  ptargets = _pad_maps(target_masks)

  def body(c, bufs):
    slot, active = plan.chunk_slots(c)
    maps = plan.map_index(query_index, slot).reshape(-1)  # [L*C]
    over, rand = _draw(key, draws, plan, slot, slot_offset, num_over, num_rand)
    over = over.reshape(L * C, num_over, 2)
    cand = sample_padded(pmasks, maps, over)
    top = smallest_k(jnp.abs(cand), num_uncertain)
    chosen = jnp.take_along_axis(over, top[..., None], axis=1)
    points = jnp.concatenate([chosen, rand.reshape(L * C, num_rand, 2)], axis=1)
    logits = sample_padded(pmasks, maps, points)
    labels = sample_padded(ptargets, jnp.tile(slot, L), points)
    bce, dice = _bce_dice(logits, labels)
    keep = jnp.tile(active, L)
    new = (jnp.where(keep, bce, 0.0), jnp.where(keep, dice, 0.0), points, logits, labels)
    start = c * C
    return tuple(
        jax.lax.dynamic_update_slice_in_dim(buf, x.reshape((L, C) + x.shape[1:]), start, axis=1)
        for buf, x in zip(bufs, new)
    )

  n = plan.n_pad
  bufs = (
      jnp.zeros((L, n)),
      jnp.zeros((L, n)),
      jnp.zeros((L, n, P, 2)),
      jnp.zeros((L, n, P)),
      jnp.zeros((L, n, P)),
  )
  bce, dice, points, logits, labels = jax.lax.fori_loop(0, plan.trips, body, bufs)
  return plan, bce, dice, (points, logits, labels)


def _to_slots(plan, compact):
  """[L, n_pad] in processing order -> [L, B, T] (padding slots 0)."""
  n = plan.B * plan.T
  pos = jnp.arange(plan.n_pad)
  dest = jnp.where(pos < plan.n_valid, plan.order, n)
  out = jnp.zeros((plan.L, n + 1), compact.dtype).at[:, dest].set(compact)
  return out[:, :n].reshape(plan.L, plan.B, plan.T)


def _from_slots(plan, per_slot):
  """[L, B, T] -> [L, n_pad] in processing order."""
  return per_slot.reshape(plan.L, -1)[:, plan.order]


def _losses_fwd(
    masks,
    target_masks,
    query_index,
    valid,
    key,
    draws,
    slot_offset,
    factors,
    num_over,
    num_uncertain,
    num_rand,
    chunk,
):
  plan, bce, dice, res = _forward(
      masks,
      target_masks,
      query_index,
      valid,
      key,
      draws,
      slot_offset,
      num_over=num_over,
      num_uncertain=num_uncertain,
      num_rand=num_rand,
      chunk=chunk,
  )
  out = (_to_slots(plan, bce), _to_slots(plan, dice))
  # A zero-size array carries the masks' static shape and dtype to the backward.
  return out, (res, query_index, valid, jnp.zeros(masks.shape + (0,), masks.dtype), factors)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _losses(
    masks,
    target_masks,
    query_index,
    valid,
    key,
    draws,
    slot_offset,
    factors,
    num_over,
    num_uncertain,
    num_rand,
    chunk,
):
  return _losses_fwd(
      masks,
      target_masks,
      query_index,
      valid,
      key,
      draws,
      slot_offset,
      factors,
      num_over,
      num_uncertain,
      num_rand,
      chunk,
  )[0]


def _point_grads(plan, residuals, g_bce, g_dice, start, active, num_points):
  """The loss gradient at each point of the C slots at processing positions
  [start, start + C) (zero where not `active`).

  Returns (taps, dx): the points' `_taps` (top-left tap in the zero-padded maps and
  bilinear fractions) and their gradients dx [L*C, P], row = layer * C + position."""
  points, logits, labels = residuals
  L, C, P = plan.L, plan.chunk, num_points
  sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, C, axis=1)
  x = sl(logits).reshape(L * C, P)
  y = sl(labels).reshape(L * C, P)
  gb = sl(g_bce).reshape(L * C, 1)
  gd = sl(g_dice).reshape(L * C, 1)
  p = jax.nn.sigmoid(x)
  num = 2.0 * jnp.sum(p * y, -1, keepdims=True) + 1.0
  den = jnp.sum(p, -1, keepdims=True) + jnp.sum(y, -1, keepdims=True) + 1.0
  d_dice_dp = -(2.0 * y * den - num) / (den * den)
  dx = gb * (p - y) / P + gd * d_dice_dp * p * (1.0 - p)
  dx = jnp.where(jnp.tile(active, L)[:, None], dx, 0.0)
  return _taps(sl(points).reshape(L * C, P, 2), plan.h, plan.w), dx


def _scatter_taps(grad, rows, taps, dx, hp, wp):
  """Adds dx's bilinear taps into `grad`, the flat [rows, hp, wp] padded maps."""
  yi, xi, fx, fy = taps
  base = rows[:, None] * (hp * wp) + yi * wp + xi
  idx = jnp.stack([base, base + 1, base + wp, base + wp + 1], -1)
  wts = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
  return grad.at[idx.reshape(-1)].add((dx[..., None] * wts).reshape(-1))


def _masks_grad(plan, residuals, query_index, g_bce, g_dice, num_points):
  """Gradient of the dense mask logits [L, B, Q, h, w] (the masks given alone)."""
  hp, wp = plan.h + 2, plan.w + 2

  def body(c, grad):
    slot, active = plan.chunk_slots(c)
    rows = plan.map_index(query_index, slot).reshape(-1)  # of the [L*B*Q] stack
    taps, dx = _point_grads(plan, residuals, g_bce, g_dice, c * plan.chunk, active, num_points)
    return _scatter_taps(grad, rows, taps, dx, hp, wp)

  grad = jnp.zeros((plan.L * plan.B * plan.Q * hp * wp,), jnp.float32)
  grad = jax.lax.fori_loop(0, plan.trips, body, grad)
  return grad.reshape(plan.L, plan.B, plan.Q, hp, wp)[:, :, :, 1:-1, 1:-1]


def _factor_grads(plan, residuals, query_index, valid, factors, g_bce, g_dice, num_points):
  """Gradients of mask_embed [L, B, Q, E] and mask_features [B, h, w, E] from the
  matched queries' gradient maps only (the einsum's two VJPs restricted to them).

  Image by image, C valid slots at a time (the slots are in processing order, valid
  ones first, image-major): the chunk's [L, C, h, w] maps are built by scattering
  the point gradients, then `maps . features[b]` gives the embeddings' gradient rows
  and `maps . embed` (summed over layers and slots) the image's feature gradient.
  Two matmuls of [L*C, h*w] per chunk, no gather of the [h, w, E] features."""
  embed, feats = factors
  L, C = plan.L, plan.chunk
  hp, wp = plan.h + 2, plan.w + 2
  counts = jnp.sum(valid.astype(jnp.int32), axis=1)
  firsts = jnp.cumsum(counts) - counts  # position of each image's first valid slot
  layer = jnp.arange(L)[:, None]

  def image(b, grads):
    g_embed, g_feats = grads
    feats_b = jax.lax.dynamic_index_in_dim(feats, b, keepdims=False)  # [h, w, E]

    def chunk(j, carry):
      g_embed, g_feats_b = carry
      want = firsts[b] + j * C
      start = jnp.minimum(want, plan.n_pad - C)  # as dynamic_slice clamps
      pos = start + jnp.arange(C)
      active = (pos >= want) & (pos < firsts[b] + counts[b])
      taps, dx = _point_grads(plan, residuals, g_bce, g_dice, start, active, num_points)
      maps = jnp.zeros((L * C * hp * wp,), jnp.float32)
      maps = _scatter_taps(maps, jnp.arange(L * C), taps, dx, hp, wp)
      maps = maps.reshape(L, C, hp, wp)[:, :, 1:-1, 1:-1].astype(feats.dtype)
      slot = jax.lax.dynamic_slice(plan.order, (start,), (C,))
      q = query_index[:, b, slot % plan.T]  # [L, C]; inactive rows' maps are 0
      g_embed = g_embed.at[layer, b, q].add(
          jnp.einsum("lchw,hwe->lce", maps, feats_b, preferred_element_type=jnp.float32)
      )
      g_feats_b = g_feats_b + jnp.einsum(
          "lchw,lce->hwe", maps, embed[layer, b, q], preferred_element_type=jnp.float32
      )
      return g_embed, g_feats_b

    g_embed, g_feats_b = jax.lax.fori_loop(
        0, (counts[b] + C - 1) // C, chunk, (g_embed, jnp.zeros(feats.shape[1:], jnp.float32))
    )
    return g_embed, jax.lax.dynamic_update_index_in_dim(g_feats, g_feats_b, b, 0)

  grads = tuple(jnp.zeros(f.shape, jnp.float32) for f in factors)
  grads = jax.lax.fori_loop(0, plan.B, image, grads)
  return tuple(g.astype(f.dtype) for g, f in zip(grads, factors))


def _losses_bwd(num_over, num_uncertain, num_rand, chunk, residuals, cotangents):
  del num_over
  sampled, query_index, valid, mask_probe, factors = residuals
  g_bce, g_dice = cotangents
  plan = _Plan(mask_probe.shape[:-1], valid, chunk)
  g_bce = _from_slots(plan, g_bce)
  g_dice = _from_slots(plan, g_dice)
  num_points = num_uncertain + num_rand
  if factors is None:
    grad = _masks_grad(plan, sampled, query_index, g_bce, g_dice, num_points)
    return (grad.astype(mask_probe.dtype),) + (None,) * 7
  grads = _factor_grads(plan, sampled, query_index, valid, factors, g_bce, g_dice, num_points)
  return (None,) * 7 + (grads,)


_losses.defvjp(_losses_fwd, _losses_bwd)


def mask_point_losses(
    masks: jax.Array,
    target_masks: jax.Array,
    query_index: jax.Array,
    valid: jax.Array,
    *,
    key: jax.Array | None = None,
    draws: tuple[jax.Array, jax.Array] | None = None,
    slot_offset: jax.Array | int = 0,
    factors: tuple[jax.Array, jax.Array] | None = None,
    num_over: int,
    num_uncertain: int,
    num_rand: int,
    chunk: int = 8,
) -> tuple[jax.Array, jax.Array]:
  """Point BCE (mean over the P points) and dice of each valid target, every layer.

  Args:
    masks: [L, B, Q, h, w] predicted mask logits (differentiable unless `factors`).
    target_masks: [B, T, H, W] ground-truth masks (any dtype, values 0/1).
    query_index: [L, B, T] int32 matched query of each target (in range).
    valid: [B, T] bool.
    key / draws: the random source (see the module doc); exactly one.
    slot_offset: added to the local slot id for the per-slot keys (the first
      global slot of this device's images under `shard_map`).
    num_over, num_uncertain, num_rand: candidates, kept, uniform points.
    factors: optional (mask_embed [L, B, Q, D], mask_features [B, h, w, D]) whose
      einsum `masks` is; the gradient then reaches them, for the matched queries
      only, and not `masks`.
    chunk: target slots processed together.

  Returns:
    (bce [L, B, T], dice [L, B, T]) float32, 0 for invalid targets.
  """
  if (key is None) == (draws is None):
    raise ValueError("mask_point_losses: pass exactly one of key and draws")
  return _losses(
      masks,
      target_masks,
      query_index.astype(jnp.int32),
      valid.astype(bool),
      key,
      draws,
      jnp.asarray(slot_offset, jnp.int32),
      factors,
      num_over,
      num_uncertain,
      num_rand,
      chunk,
  )
