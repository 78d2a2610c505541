"""Tests of the device Hungarian (mtaclip_jax/objective/matching/device.py) against scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import validate
from mtaclip_jax.objective.matching import device
from mtaclip_jax.objective.matching import hungarian
from tests import train_fixtures
from tests.parity.test_matching import _check_is_optimal_matching
from tests.parity.test_matching import _scipy_reference


def _device(cost, valid):
  return np.asarray(
      jax.jit(lambda c, v: hungarian.hungarian_match(c, v, matcher="device"))(
          jnp.asarray(cost), jnp.asarray(valid)
      )
  )


def test_equals_scipy_on_distinct_costs():
  """Continuous random costs (no ties): the very assignment scipy returns, for
  every shape from 1x1 to square, with targets missing anywhere in the row."""
  rng = np.random.default_rng(0)
  for q, t in [(1, 1), (3, 3), (12, 7), (100, 8), (20, 20), (9, 1)]:
    cost = rng.normal(size=(2, 5, q, t)).astype(np.float32)
    valid = rng.random((5, t)) < 0.7
    valid[0] = True
    valid[1] = False
    got = _device(cost, valid)
    assert got.dtype == np.int32 and got.shape == (2, 5, t)
    np.testing.assert_array_equal(got, _scipy_reference(cost, valid), err_msg=f"{q}x{t}")


def test_ties_give_an_optimal_one_to_one_assignment():
  rng = np.random.default_rng(1)
  cost = rng.integers(0, 3, size=(3, 4, 10, 6)).astype(np.float32)
  cost[:, 2] = 1.0  # all tied
  valid = rng.random((4, 6)) < 0.8
  valid[3] = False
  got = _device(cost, valid)
  np.testing.assert_array_equal(got[:, 3], -1)
  _check_is_optimal_matching(got, cost, valid)


def test_matching_costs_of_a_model_equal_the_host():
  """The costs the loss builds (softmax class term, sampled BCE and dice: many
  near-equal entries for untrained queries) at the demo's sizes: both matchers agree."""
  rng = np.random.default_rng(2)
  layers, b, q, t = 10, 4, 100, 16
  cost = (
      rng.normal(size=(layers, b, q, 1)) * 0.1
      + rng.normal(size=(layers, b, 1, t))
      + rng.normal(size=(layers, b, q, t)) * 0.3
  )
  cost = cost.astype(np.float32)
  valid = np.zeros((b, t), bool)
  for i, n in enumerate([16, 8, 1, 0]):
    valid[i, rng.permutation(t)[:n]] = True
  np.testing.assert_array_equal(
      _device(cost, valid), np.asarray(hungarian.hungarian_match(cost, valid))
  )


def test_nonfinite_costs_are_avoided():
  rng = np.random.default_rng(3)
  cost = rng.normal(size=(2, 6, 4)).astype(np.float32)
  cost[0, 0, :] = np.nan  # query 0 of image 0 is never worth taking
  cost[1, :, 1] = np.inf  # every query is infinite for target 1: still one is given
  valid = np.array([[True, True, False, True], [True, True, True, True]])
  got = _device(cost, valid)
  assert 0 not in got[0][valid[0]]
  assert np.all(got[~valid] == -1)
  assert len(set(got[1].tolist())) == 4 and np.all(got[1] >= 0)
  finite = np.nan_to_num(cost, nan=1e30, posinf=1e30)
  _check_is_optimal_matching(got[None], finite[None], valid)


def test_gradients_flow_only_through_the_gathered_costs():
  """Indices are integers: a loss that gathers with them has gradients only
  through the gathered costs, as with the host matcher."""
  rng = np.random.default_rng(4)
  cost = jnp.asarray(rng.normal(size=(3, 2, 7, 5)).astype(np.float32))
  valid = jnp.ones((2, 5), bool)

  def loss(c):
    idx = hungarian.hungarian_match(c, valid, matcher="device")  # [3, 2, 5]
    return jnp.take_along_axis(c, idx[:, :, None, :], axis=2).sum()

  g = jax.grad(loss)(cost)
  idx = np.asarray(hungarian.hungarian_match(cost, valid))
  expected = np.zeros(cost.shape, np.float32)
  for layer, image, target in np.ndindex(3, 2, 5):
    expected[layer, image, idx[layer, image, target], target] = 1.0
  np.testing.assert_array_equal(np.asarray(g), expected)


def test_more_targets_than_queries_is_refused():
  with pytest.raises(ValueError, match="exceed"):
    device.assign_one(jnp.zeros((5, 3)), jnp.ones((5,), bool))


def test_unknown_matcher_is_named(tmp_path):
  with pytest.raises(AssertionError, match="gpu"):  # validate_config names the key
    hungarian.hungarian_match(jnp.zeros((2, 5, 3)), jnp.ones((2, 3), bool), matcher="gpu")
  config = train_fixtures.tiny_config(tmp_path)
  config.loss.matcher = "scipy"
  with pytest.raises(errors.ConfigError, match="config.loss.matcher='scipy'"):
    validate.validate_config(config)
