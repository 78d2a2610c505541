"""point_loss: the chunked, valid-targets-only mask losses equal a direct per-slot
implementation of Mask2Former's point sampling, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtaclip_jax.objective import point_loss
from mtaclip_jax.objective.matching import costs

L, B, Q, H_MASK, T, H_IMG = 3, 2, 6, 8, 5, 32
P_OVER, K, P_RAND = 40, 10, 5


def problem(seed=0):
  rng = np.random.default_rng(seed)
  masks = jnp.asarray(rng.normal(size=(L, B, Q, H_MASK, H_MASK)).astype(np.float32))
  targets = jnp.asarray((rng.random((B, T, H_IMG, H_IMG)) > 0.5).astype(np.uint8))
  index = jnp.asarray(rng.integers(0, Q, (L, B, T)).astype(np.int32))
  valid = jnp.asarray(np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], bool))
  over = jnp.asarray(rng.random((L, B, T, P_OVER, 2)).astype(np.float32))
  rand = jnp.asarray(rng.random((L, B, T, P_RAND, 2)).astype(np.float32))
  return masks, targets, index, valid, over, rand


def reference(masks, targets, index, valid, over, rand):
  """One slot at a time, as transformers' Mask2FormerLoss: the K candidates with the
  smallest |logit| (numpy argsort) plus the uniform points; plain autodiff."""
  bce = np.zeros((L, B, T), object)
  dice = np.zeros((L, B, T), object)
  for l in range(L):
    for b in range(B):
      for t in range(T):
        if not valid[b, t]:
          bce[l, b, t] = dice[l, b, t] = jnp.float32(0)
          continue
        m = masks[l, b, index[l, b, t]][None]
        cand = np.asarray(costs.point_sample(jax.lax.stop_gradient(m), over[l, b, t]))[0]
        chosen = over[l, b, t][np.argsort(np.abs(cand), kind="stable")[:K]]
        pts = jnp.concatenate([chosen, rand[l, b, t]])
        x = costs.point_sample(m, pts)[0]
        y = costs.point_sample(targets[b, t][None], pts)[0]
        p = jax.nn.sigmoid(x)
        bce[l, b, t] = jnp.mean(jax.nn.softplus(x) - x * y)
        dice[l, b, t] = 1 - (2 * jnp.sum(p * y) + 1) / (jnp.sum(p) + jnp.sum(y) + 1)
  return jnp.stack(list(bce.ravel())).reshape(L, B, T), jnp.stack(list(dice.ravel())).reshape(
      L, B, T
  )


def weighted(bce, dice):
  w = jnp.arange(1, L * B * T + 1, dtype=jnp.float32).reshape(L, B, T) / 10
  return jnp.sum(bce * w) + jnp.sum(dice * w[::-1])


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_equals_per_slot_reference_value_and_gradient(chunk):
  masks, targets, index, valid, over, rand = problem()
  ref_fn = lambda m: weighted(*reference(m, targets, index, valid, over, rand))
  ref_loss, ref_grad = jax.value_and_grad(ref_fn)(masks)

  def ours(m):
    return weighted(
        *point_loss.mask_point_losses(
            m,
            targets,
            index,
            valid,
            draws=(over, rand),
            num_over=P_OVER,
            num_uncertain=K,
            num_rand=P_RAND,
            chunk=chunk,
        )
    )

  loss, grad = jax.jit(jax.value_and_grad(ours))(masks)
  # fp32; both sample with the same bilinear arithmetic.
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(grad)).sum() > 0


def _keyed(masks, targets, index, valid, key, offset=0):
  return point_loss.mask_point_losses(
      masks,
      targets,
      index,
      valid,
      key=key,
      slot_offset=offset,
      num_over=P_OVER,
      num_uncertain=K,
      num_rand=P_RAND,
      chunk=2,
  )


def test_key_draws_are_per_slot_and_layout_independent():
  masks, targets, index, valid, _, _ = problem(1)
  fn = jax.jit(_keyed)
  bce, dice = fn(masks, targets, index, valid, jax.random.key(0))
  again, _ = fn(masks, targets, index, valid, jax.random.key(0))
  other, _ = fn(masks, targets, index, valid, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(bce), np.asarray(again))
  assert not np.allclose(
      np.asarray(bce)[:, np.asarray(valid)], np.asarray(other)[:, np.asarray(valid)]
  )
  assert np.all(np.asarray(bce)[:, ~np.asarray(valid)] == 0)
  # One image at a time with its global slot offset: the same draws (as under
  # shard_map with one image per device).
  for b in range(B):
    one, one_dice = fn(
        masks[:, b : b + 1],
        targets[b : b + 1],
        index[:, b : b + 1],
        valid[b : b + 1],
        jax.random.key(0),
        b * T,
    )
    np.testing.assert_allclose(np.asarray(one)[:, 0], np.asarray(bce)[:, b], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(one_dice)[:, 0], np.asarray(dice)[:, b], rtol=1e-6)


def test_no_valid_target_gives_zero_loss_and_gradient():
  masks, targets, index, _, _, _ = problem(2)
  none = jnp.zeros((B, T), bool)
  loss, grad = jax.jit(
      jax.value_and_grad(lambda m: weighted(*_keyed(m, targets, index, none, jax.random.key(0))))
  )(masks)
  assert float(loss) == 0.0
  assert not np.any(np.asarray(grad))


def test_needs_exactly_one_random_source():
  masks, targets, index, valid, over, rand = problem()
  with pytest.raises(ValueError, match="exactly one"):
    point_loss.mask_point_losses(
        masks, targets, index, valid, num_over=P_OVER, num_uncertain=K, num_rand=P_RAND
    )


@pytest.mark.parametrize("k", [1, 7, 64, 200])
def test_smallest_k_is_the_set_top_k_picks(k):
  """Same indices as lax.top_k(-v, k) (ties to the lower index), in index order;
  with ties, zeros, a subnormal and inf in the rows."""
  rng = np.random.default_rng(k)
  v = np.abs(rng.normal(size=(5, 200))).astype(np.float32)
  v[:, ::7] = 0.5
  v[1, :40] = 0.0
  v[2, 3] = np.inf
  v[3, 5] = 1e-42
  v[4] = 2.0  # all tied
  got = np.asarray(jax.jit(point_loss.smallest_k, static_argnums=1)(jnp.asarray(v), k))
  want = np.sort(np.asarray(jax.lax.top_k(-jnp.asarray(v), k)[1]), axis=1)
  np.testing.assert_array_equal(got, want)


def test_smallest_k_takes_half_precision():
  v = jnp.asarray([[0.5, 0.25, 2.0, 0.25, 1.0]], jnp.bfloat16)
  np.testing.assert_array_equal(point_loss.smallest_k(v, 3), [[0, 1, 3]])


D = 4


@pytest.mark.parametrize("chunk,keyed", [(1, False), (3, False), (100, False), (2, True)])
def test_factored_gradient_equals_autodiff_through_the_masks(chunk, keyed):
  """With `factors`, the backward contracts only the matched queries' gradient maps
  against mask_embed / mask_features; it must equal plain autodiff of
  masks = einsum(mask_embed, mask_features) (the model's mask head)."""
  _, targets, index, valid, over, rand = problem(3)
  rng = np.random.default_rng(4)
  embed = jnp.asarray(rng.normal(size=(L, B, Q, D)).astype(np.float32))
  feats = jnp.asarray(rng.normal(size=(B, H_MASK, H_MASK, D)).astype(np.float32))
  source = {"key": jax.random.key(5)} if keyed else {"draws": (over, rand)}
  make = lambda e, f: jnp.einsum("lbqc,bhwc->lbqhw", e, f)

  def losses(masks, factors=None):
    return weighted(
        *point_loss.mask_point_losses(
            masks,
            targets,
            index,
            valid,
            factors=factors,
            num_over=P_OVER,
            num_uncertain=K,
            num_rand=P_RAND,
            chunk=chunk,
            **source,
        )
    )

  dense = jax.jit(jax.value_and_grad(lambda e, f: losses(make(e, f)), argnums=(0, 1)))
  factored = jax.jit(
      jax.value_and_grad(
          lambda e, f: losses(jax.lax.stop_gradient(make(e, f)), (e, f)), argnums=(0, 1)
      )
  )
  (want, (ge, gf)), (got, (fe, ff)) = dense(embed, feats), factored(embed, feats)
  assert float(got) == float(want)
  # fp32: the same products summed in another order.
  for ours, ref in ((fe, ge), (ff, gf)):
    scale = np.abs(np.asarray(ref)).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-5 * scale)
  # Queries no valid target is matched to get exactly nothing.
  matched = np.zeros((L, B, Q), bool)
  for l, b, t in zip(*np.nonzero(np.broadcast_to(np.asarray(valid), (L, B, T)))):
    matched[l, b, int(index[l, b, t])] = True
  assert np.all(np.asarray(fe)[~matched] == 0) and np.any(np.asarray(fe)[matched])


def test_factored_gradient_keeps_the_factors_dtype():
  masks, targets, index, valid, over, rand = problem(5)
  embed = jnp.ones((L, B, Q, D), jnp.bfloat16)
  feats = jnp.ones((B, H_MASK, H_MASK, D), jnp.bfloat16)
  grads = jax.grad(
      lambda e, f: weighted(
          *point_loss.mask_point_losses(
              masks,
              targets,
              index,
              valid,
              factors=(e, f),
              draws=(over, rand),
              num_over=P_OVER,
              num_uncertain=K,
              num_rand=P_RAND,
          )
      ),
      argnums=(0, 1),
  )(embed, feats)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
  assert all(np.any(np.asarray(g, np.float32)) for g in grads)
