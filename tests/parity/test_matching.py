"""Tests of mtaclip_jax.matching: point sampling, costs, host Hungarian, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from mtaclip_jax.objective.matching import costs
from mtaclip_jax.objective.matching import hungarian
from tests import train_fixtures

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _scipy_reference(cost, valid):
  """Query per target from scipy on each image's valid columns; -1 elsewhere."""
  cost = np.asarray(cost)
  out = np.full(cost.shape[:-2] + cost.shape[-1:], -1, np.int32)
  for index in np.ndindex(*cost.shape[:-2]):
    cols = np.flatnonzero(valid[index[-1]])
    if cols.size:
      rows, tgt = linear_sum_assignment(cost[index][:, cols])
      out[index][cols[tgt]] = rows
  return out


def _check_is_optimal_matching(indices, cost, valid):
  """indices are a valid one-to-one matching with scipy's optimal total cost."""
  ref = _scipy_reference(cost, valid)
  for index in np.ndindex(*cost.shape[:-2]):
    v = valid[index[-1]]
    got = indices[index]
    assert np.all(got[~v] == -1)
    assert len(set(got[v].tolist())) == v.sum()  # one query per target
    assert np.all((got[v] >= 0) & (got[v] < cost.shape[-2]))
    total = cost[index][got[v], np.flatnonzero(v)].sum()
    best = cost[index][ref[index][v], np.flatnonzero(v)].sum()
    np.testing.assert_allclose(total, best, rtol=1e-6)


def test_hungarian_equals_scipy_random_ties_and_empty_images():
  rng = np.random.default_rng(0)
  layers, b, q, t = 3, 4, 12, 7
  cost = rng.normal(size=(layers, b, q, t)).astype(np.float32)
  cost[:, 1] = rng.integers(0, 3, size=(layers, q, t))  # many ties
  cost[:, 2] = 1.0  # all tied
  valid = rng.random((b, t)) < 0.6
  valid[0] = True
  valid[3] = False  # image without any segment
  valid[1, :2] = False
  got = np.asarray(jax.jit(hungarian.hungarian_match)(jnp.asarray(cost), jnp.asarray(valid)))
  assert got.dtype == np.int32 and got.shape == (layers, b, t)
  np.testing.assert_array_equal(got, _scipy_reference(cost, valid))
  np.testing.assert_array_equal(got[:, 3], -1)
  _check_is_optimal_matching(got, cost, valid)


def test_hungarian_no_leading_dims_and_nonfinite_costs():
  rng = np.random.default_rng(1)
  cost = rng.normal(size=(2, 6, 4)).astype(np.float32)
  cost[0, 0, :] = np.nan  # query 0 of image 0 is never worth taking
  cost[1, :, 1] = np.inf
  valid = np.array([[True, True, False, True], [True, True, True, True]])
  got = np.asarray(hungarian.hungarian_match(jnp.asarray(cost), jnp.asarray(valid)))
  assert got.shape == (2, 4)
  assert 0 not in got[0][valid[0]]
  assert np.all(got[~valid] == -1)
  assert sorted(got[1].tolist()) == sorted(set(got[1].tolist()))


def test_hungarian_rejects_more_targets_than_queries():
  with pytest.raises(AssertionError, match="exceed"):  # validate_config names the keys
    hungarian.hungarian_match(jnp.zeros((2, 3, 5)), jnp.ones((2, 5), bool))


@pytest.mark.parity
def test_point_sample_matches_torch_grid_sample():
  import torch

  rng = np.random.default_rng(2)
  maps = rng.normal(size=(2, 3, 9, 13)).astype(np.float32)
  points = rng.random((2, 50, 2)).astype(np.float32)
  points[0, :4] = [[0.0, 0.0], [0.999, 0.999], [0.0, 0.5], [0.5, 0.999]]  # borders
  got = np.asarray(costs.point_sample(jnp.asarray(maps), jnp.asarray(points)))
  ref = torch.nn.functional.grid_sample(
      torch.from_numpy(maps), 2.0 * torch.from_numpy(points)[:, :, None] - 1.0, align_corners=False
  )[..., 0].numpy()
  np.testing.assert_allclose(got, ref, atol=1e-6)
  # uint8 maps (targets) sample the same as their float copy
  binary = (maps > 0).astype(np.uint8)
  got_u8 = np.asarray(costs.point_sample(jnp.asarray(binary), jnp.asarray(points)))
  got_f = np.asarray(costs.point_sample(jnp.asarray(binary, jnp.float32), jnp.asarray(points)))
  np.testing.assert_allclose(got_u8, got_f, atol=1e-7)


def _random_problem(seed, layers=2, b=3, q=10, t=5, c=7, h=16, big=64):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(layers, b, q, c + 1)).astype(np.float32)
  masks = (3 * rng.normal(size=(layers, b, q, h, h))).astype(np.float32)
  # blocky targets so that bilinear samples are mostly 0/1
  blocks = rng.random((b, t, big // 8, big // 8)) < 0.4
  target_masks = np.repeat(np.repeat(blocks, 8, axis=2), 8, axis=3).astype(np.uint8)
  classes = rng.integers(0, c, size=(b, t)).astype(np.int32)
  valid = rng.random((b, t)) < 0.7
  valid[0] = True
  return logits, masks, target_masks, classes, valid


@pytest.mark.parity
@pytest.mark.slow
def test_matcher_equals_transformers(monkeypatch):
  import torch
  from transformers.models.mask2former import modeling_mask2former as hf

  logits, masks, target_masks, classes, valid = _random_problem(3)
  layers, b = logits.shape[:2]
  num_points = 300
  points = np.random.default_rng(4).random((layers, b, num_points, 2)).astype(np.float32)
  cost = costs.match_costs(
      jnp.asarray(logits),
      jnp.asarray(masks),
      jnp.asarray(target_masks),
      jnp.asarray(classes),
      jnp.asarray(points),
  )
  got = np.asarray(hungarian.hungarian_match(cost, jnp.asarray(valid)))

  matcher = hf.Mask2FormerHungarianMatcher(
      cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points
  )
  for layer in range(layers):
    draws = [torch.from_numpy(points[layer, i][None]) for i in range(b)]

    def fake_rand(*shape, **kwargs):
      out = draws.pop(0)
      assert tuple(out.shape) == tuple(shape)
      return out

    monkeypatch.setattr(torch, "rand", fake_rand)
    cols = [np.flatnonzero(v) for v in valid]
    ref = matcher(
        torch.from_numpy(masks[layer]),
        torch.from_numpy(logits[layer]),
        [torch.from_numpy(target_masks[i][cols[i]]).float() for i in range(b)],
        [torch.from_numpy(classes[i][cols[i]]).long() for i in range(b)],
    )
    monkeypatch.undo()
    assert not draws
    for i, (rows, tgt) in enumerate(ref):
      expected = np.full(valid.shape[1], -1)
      expected[cols[i][tgt.numpy()]] = rows.numpy()
      np.testing.assert_array_equal(got[layer, i], expected)
      # the costs themselves, not only the argmin
      pm = hf.sample_point(
          torch.from_numpy(masks[layer, i])[:, None],
          torch.from_numpy(points[layer, i][None]).repeat(masks.shape[2], 1, 1),
          align_corners=False,
      )[:, 0]
      tm = hf.sample_point(
          torch.from_numpy(target_masks[i]).float()[:, None],
          torch.from_numpy(points[layer, i][None]).repeat(target_masks.shape[1], 1, 1),
          align_corners=False,
      )[:, 0]
      ref_cost = (
          5 * hf.pair_wise_sigmoid_cross_entropy_loss(pm, tm)
          + 5 * hf.pair_wise_dice_loss(pm, tm)
          - 2 * torch.from_numpy(logits[layer, i]).softmax(-1)[:, classes[i]]
      )
      np.testing.assert_allclose(np.asarray(cost[layer, i]), ref_cost.numpy(), rtol=1e-5, atol=1e-5)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mtaclip_jax.objective.matching import hungarian
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    cost = rng.normal(size=(3, 8, 12, 6)).astype(np.float32)
    valid = rng.random((8, 6)) < 0.6
    valid[5] = False
    ref = np.asarray(jax.jit(hungarian.hungarian_match)(cost, valid))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    cost_s = jax.device_put(cost, NamedSharding(mesh, P(None, "data")))
    valid_s = jax.device_put(valid, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):  # mesh taken from the context
        got = jax.jit(hungarian.hungarian_match)(cost_s, valid_s)
    assert got.sharding.spec == P(None, "data"), got.sharding
    np.testing.assert_array_equal(np.asarray(got), ref)
    got2 = jax.jit(lambda c, v: hungarian.hungarian_match(c, v, mesh=mesh))(cost_s, valid_s)
    np.testing.assert_array_equal(np.asarray(got2), ref)
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh2):
        got3 = jax.jit(hungarian.hungarian_match)(cost, valid)
    np.testing.assert_array_equal(np.asarray(got3), ref)
    # Costs over the per-device size that XLA:CPU's fake devices handle in one
    # callback followed by a cross-device sum: matched in chunks, same result.
    big = rng.normal(size=(9, 8, 100, 30)).astype(np.float32)
    big_valid = rng.random((8, 30)) < 0.5
    ref_big = np.asarray(jax.jit(hungarian.hungarian_match)(big, big_valid))
    with jax.set_mesh(mesh):
        f = jax.jit(lambda c, v: (hungarian.hungarian_match(c, v),
                                  hungarian.hungarian_match(c, v).sum()))
        got_big, total = f(jax.device_put(big, NamedSharding(mesh, P(None, "data"))),
                           jax.device_put(big_valid, NamedSharding(mesh, P("data"))))
    np.testing.assert_array_equal(np.asarray(got_big), ref_big)
    assert int(total) == int(ref_big.sum())
    # The device matcher under the same meshes: per device in shard_map.
    device = lambda c, v: hungarian.hungarian_match(c, v, matcher="device")
    with jax.set_mesh(mesh):
        got4 = jax.jit(device)(cost_s, valid_s)
        got5 = jax.jit(device)(jax.device_put(big, NamedSharding(mesh, P(None, "data"))),
                               jax.device_put(big_valid, NamedSharding(mesh, P("data"))))
    assert got4.sharding.spec == P(None, "data"), got4.sharding
    np.testing.assert_array_equal(np.asarray(got4), ref)
    np.testing.assert_array_equal(np.asarray(got5), ref_big)
    with jax.set_mesh(mesh2):
        np.testing.assert_array_equal(np.asarray(jax.jit(device)(cost, valid)), ref)
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_sharded_equals_unsharded_on_8_fake_devices():
  env = train_fixtures.fake_devices_env(8)
  proc = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr
