"""MTA-CLIP / Mask2Former training losses (paper §3.2, Eq. 7-10; docs/RECIPES.md).

On every supervised layer: class cross-entropy over C+1 ("none" weighted
`no_object_weight`), sigmoid BCE and dice on points chosen by uncertainty
importance sampling (as Mask2Former's `get_uncertain_point_coords_with_randomness`),
and, with text queries, the mask-text similarity loss (MixNeg / SeparateNeg). Terms
are summed over layers, as Mask2Former's auxiliary losses.

Normalisation: mask/dice sums over matched pairs are divided by the number of valid
ground-truth segments of the whole (global) batch, clamped to >= 1; class CE and the
similarity loss are weighted means over all queries of the global batch. Under a
jit with batch shardings these reductions are global by construction; a step split
into micro-batches (train/accumulate.py) passes the whole batch's `batch_normalizers`, so
its micro-batch losses add up to the whole batch's loss.

Random points are drawn from `rng`; a `points` dict (see `draw_points`) can be
passed instead, which the parity tests use to feed transformers the same points.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mtaclip_jax.objective import point_loss
from mtaclip_jax.objective.matching import hungarian


def _num_uncertain(loss_config) -> tuple[int, int, int]:
  """(oversampled, importance-sampled, uniform) point counts, as Mask2Former."""
  num_points = int(loss_config.num_points)
  oversampled = int(num_points * loss_config.oversample_ratio)
  uncertain = int(loss_config.importance_sample_ratio * num_points)
  return oversampled, uncertain, num_points - uncertain


def draw_points(rng: jax.Array, num_layers: int, batch: int, targets: int, loss_config) -> dict:
  """All uniform draws of one step.

  Returns {"match": [L, B, P, 2] points of the matching costs, "over": [L, B, T,
  P*oversample, 2] candidates for importance sampling, "random": [L, B, T,
  P - P*importance, 2] uniform points of the mask losses}, (x, y) in [0, 1].
  Only for tests and small shapes: `compute_loss` draws from its key per valid
  target slot by default (`point_loss`), which never holds these arrays.
  """
  oversampled, _, uniform = _num_uncertain(loss_config)
  k_match, k_over, k_rand = jax.random.split(rng, 3)
  shape = (num_layers, batch, targets)
  return {
      "match": hungarian.sample_match_points(
          k_match, num_layers, batch, int(loss_config.num_points)
      ),
      "over": jax.random.uniform(k_over, shape + (oversampled, 2)),
      "random": jax.random.uniform(k_rand, shape + (uniform, 2)),
  }


def query_targets(
    indices: jax.Array, classes: jax.Array, valid: jax.Array, num_queries: int, none_class: int
) -> tuple[jax.Array, jax.Array]:
  """Per-query target class and matched flag from per-target matches.

  indices [L, B, T] (query per target, -1 invalid), classes/valid [B, T] ->
  (target class [L, B, Q] int32, "none" where unmatched; matched [L, B, Q] bool).
  """
  onehot = (indices[..., None] == jnp.arange(num_queries)) & valid[None, :, :, None]
  matched = jnp.any(onehot, axis=-2)
  cls = jnp.sum(jnp.where(onehot, classes[None, :, :, None], 0), axis=-2)
  return jnp.where(matched, cls, none_class).astype(jnp.int32), matched


def batch_normalizers(valid: jax.Array, num_queries: int, no_object_weight: float) -> dict:
  """The loss denominators of a whole batch, from its valid slots alone.

  valid [B, T] -> {"num_masks": number of valid segments (>= 1), "class_weights": the
  sum of the per-query class weights, which is the same on every layer: the matcher
  gives each valid segment its own query (min(segments, Q) matched per image), every
  other query weighs `no_object_weight`}.
  """
  valid = jnp.asarray(valid).astype(bool)
  per_image = jnp.minimum(jnp.sum(valid, axis=1), num_queries).astype(jnp.float32)
  matched = jnp.sum(per_image)
  unmatched = valid.shape[0] * num_queries - matched
  return {
      "num_masks": jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0),
      "class_weights": matched + no_object_weight * unmatched,
  }


def _weighted_mean(weights, values, denom):
  """Per layer sum(weights * values) / denom, denom = sum(weights) when None."""
  total = jnp.sum(weights * values, axis=(1, 2))
  return total / (jnp.sum(weights, axis=(1, 2)) if denom is None else denom)


def class_loss(
    logits: jax.Array, target: jax.Array, weights: jax.Array, denom: jax.Array | None = None
) -> jax.Array:
  """Weighted-mean CE per layer (torch CrossEntropyLoss(weight=...) semantics).

  logits [L, B, Q, C+1], target [L, B, Q], weights [L, B, Q] -> [L]. `denom`: the
  whole batch's weight sum when these are one micro-batch's queries.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  return _weighted_mean(weights, nll, denom)


def similarity_loss(
    m_proj: jax.Array,
    t_proj: jax.Array,
    target: jax.Array,
    weights: jax.Array,
    neg: str = "mix",
    tau: float = 1.0,
    denom: jax.Array | None = None,
) -> jax.Array:
  """Mask-text contrastive loss of MTA-CLIP (paper Eq. 8 MixNeg, Eq. 9 SeparateNeg).

  S(m, t) = m'.t' / tau. Query i with target class j (C = "none" when unmatched)
  takes as positive (j, k~), k~ = argmax_k S(m_i, t_{j,k}) (not differentiated).
  MixNeg normalises over all K*(C+1) embeddings; SeparateNeg over the positive and
  the K embeddings of every other class (K*C of them, "none" included as a class).

  Args:
    m_proj: [L, B, Q, D]; t_proj: [L, B, K, C+1, D] (L2-normalised).
    target: [L, B, Q] int class per query; weights: [L, B, Q].
    neg: "mix" | "separate".
    denom: as `class_loss`.

  Returns:
    [L] weighted mean over queries of -log softmax(positive).
  """
  if neg not in ("mix", "separate"):
    raise ValueError(f"config.loss.neg must be 'mix' or 'separate', got {neg!r}.")
  s = (
      jnp.einsum(
          "lbqd,lbkcd->lbqkc",
          m_proj.astype(jnp.float32),
          t_proj.astype(jnp.float32),
          precision=jax.lax.Precision.HIGHEST,
      )
      / tau
  )
  l, b, q, k, c = s.shape
  own = jnp.arange(c) == target[..., None]  # [L, B, Q, C+1]
  s_own = jnp.take_along_axis(
      s, jnp.broadcast_to(target[..., None, None], (l, b, q, k, 1)), axis=-1
  )[
      ..., 0
  ]  # [L, B, Q, K]
  k_pos = jnp.argmax(jax.lax.stop_gradient(s_own), axis=-1)
  s_pos = jnp.take_along_axis(s_own, k_pos[..., None], axis=-1)[..., 0]
  if neg == "mix":
    keep = jnp.ones((l, b, q, k, c), bool)
  else:
    pos = (jnp.arange(k) == k_pos[..., None])[..., None] & own[..., None, :]
    keep = ~own[..., None, :] | pos
  log_norm = jax.nn.logsumexp(jnp.where(keep, s, -jnp.inf), axis=(-2, -1))
  return _weighted_mean(weights, log_norm - s_pos, denom)


def _point_losses(masks, target_masks, query_index, valid, key, draws, factors, loss_config, mesh):
  """`point_loss.mask_point_losses` with this config; under a mesh with a "data" axis,
  per device (shard_map): each device compacts and loops over its own images."""
  oversampled, uncertain, uniform = _num_uncertain(loss_config)
  chunk = int(getattr(loss_config, "target_chunk", 0) or 0) or (
      8 if jax.default_backend() == "cpu" else 32
  )
  fn = functools.partial(
      point_loss.mask_point_losses,
      num_over=oversampled,
      num_uncertain=uncertain,
      num_rand=uniform,
      chunk=chunk,
  )
  data_mesh = hungarian.data_mesh(mesh)
  if data_mesh is None:
    return fn(masks, target_masks, query_index, valid, key=key, draws=draws, factors=factors)
  axis = hungarian.DATA_AXIS

  def local(masks, target_masks, query_index, valid, key, draws, factors):
    offset = jax.lax.axis_index(axis) * valid.shape[0] * valid.shape[1]
    return fn(
        masks,
        target_masks,
        query_index,
        valid,
        key=key,
        draws=draws,
        slot_offset=offset,
        factors=factors,
    )

  layer_spec = P(None, axis)
  draws_spec = None if draws is None else (layer_spec, layer_spec)
  factors_spec = None if factors is None else (layer_spec, P(axis))
  return jax.shard_map(
      local,
      mesh=data_mesh,
      in_specs=(layer_spec, P(axis), layer_spec, P(axis), P(), draws_spec, factors_spec),
      out_specs=(layer_spec, layer_spec),
      check_vma=False,
  )(masks, target_masks, query_index, valid, key, draws, factors)


def compute_loss(
    outputs: dict,
    batch: dict,
    rng: jax.Array,
    loss_config,
    num_classes: int,
    *,
    mesh=None,
    points: dict | None = None,
    normalizers: dict | None = None,
) -> tuple[jax.Array, dict]:
  """Total training loss and its terms (CONTRACT.md "Losses").

  Args:
    outputs: model dict: logits [L, B, Q, C+1], masks [L, B, Q, h, w], and
      optionally m_proj [L, B, Q, D], t_proj [L, B, K, C+1, D], and the masks'
      factors mask_embed [L, B, Q, E] and mask_features [B, h, w, E]: with them
      the mask losses' gradient goes to the factors (matched queries only) and
      `masks` is not differentiated.
    batch: masks [B, T, H, W], classes [B, T], valid [B, T].
    rng: PRNG key for the point draws (unused when `points` is given).
    loss_config: `config.loss`.
    num_classes: C (without "none").
    mesh: mesh for the matching callback (default: the current mesh).
    points: optional dict of `draw_points` arrays to use instead of `rng`.
    normalizers: the whole batch's `batch_normalizers` when `batch` is one of its
      micro-batches (default: this batch's own counts).

  Returns:
    (loss, metrics): metrics hold the per-term sums over layers (`loss_ce`,
    `loss_mask`, `loss_dice`, `loss_sim`), the last layer's terms (`*_last`) and
    `total` (= loss), all unweighted except `total`.
  """
  logits, masks = outputs["logits"], outputs["masks"]
  num_layers, b, q, num_labels = logits.shape
  if num_labels != num_classes + 1:
    raise ValueError(
        f"outputs['logits'] has {num_labels} classes, expected "
        f"num_classes + 1 = {num_classes + 1} (config.model.num_classes)."
    )
  target_masks, classes = batch["masks"], batch["classes"].astype(jnp.int32)
  valid = batch["valid"].astype(bool)
  t = classes.shape[-1]
  if masks.shape[:3] != (num_layers, b, q) or target_masks.shape[:2] != (b, t):
    raise ValueError(
        f"inconsistent shapes: logits {logits.shape}, masks {masks.shape}, "
        f"batch masks {target_masks.shape}, classes {classes.shape}."
    )
  if points is None:
    k_match, k_layers = jax.random.split(rng)
    match_points = hungarian.sample_match_points(
        k_match, num_layers, b, int(loss_config.num_points)
    )
    k_points, draws = k_layers, None
  else:
    match_points, k_points, draws = points["match"], None, (points["over"], points["random"])

  indices = hungarian.match(outputs, batch, match_points, loss_config, mesh=mesh)  # [L, B, T]
  query_index = jnp.clip(indices, 0, q - 1)

  factors = None
  if "mask_embed" in outputs and "mask_features" in outputs:
    # The mask losses differentiate the matched queries' masks only, through the
    # masks' factors (objective/point_loss.py); nothing else differentiates `masks`.
    factors = (outputs["mask_embed"], outputs["mask_features"])
    masks = jax.lax.stop_gradient(masks)
  bce, dice = _point_losses(
      masks, target_masks, query_index, valid, k_points, draws, factors, loss_config, mesh
  )  # [L, B, T]
  if normalizers is None:
    num_masks, class_weights = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0), None
  else:
    num_masks, class_weights = normalizers["num_masks"], normalizers["class_weights"]
  loss_mask = jnp.sum(bce, axis=(1, 2)) / num_masks
  loss_dice = jnp.sum(dice, axis=(1, 2)) / num_masks

  target_q, matched = query_targets(indices, classes, valid, q, num_classes)
  weights = jnp.where(matched, 1.0, loss_config.no_object_weight)
  loss_ce = class_loss(logits, target_q, weights, class_weights)

  terms = {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}
  weight = {
      "loss_ce": loss_config.class_weight,
      "loss_mask": loss_config.mask_weight,
      "loss_dice": loss_config.dice_weight,
  }
  if loss_config.similarity and "m_proj" in outputs:
    terms["loss_sim"] = similarity_loss(
        outputs["m_proj"],
        outputs["t_proj"],
        target_q,
        weights,
        neg=loss_config.neg,
        tau=loss_config.tau,
        denom=class_weights,
    )
    weight["loss_sim"] = loss_config.sim_weight
  total = sum(weight[name] * jnp.sum(v) for name, v in terms.items())
  metrics = {name: jnp.sum(v) for name, v in terms.items()}
  metrics.update({f"{name}_last": v[-1] for name, v in terms.items()})
  metrics["total"] = total
  return total, metrics
