"""PointwiseConv / pointwise_conv = nn.Conv(features, (1, 1)) and Dense = nn.Dense: same
variables, and in float64 the same output and gradients (their own weight and bias
gradients)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import flops
from mtaclip_jax.models.ops.pointwise import Dense
from mtaclip_jax.models.ops.pointwise import PointwiseConv
from mtaclip_jax.models.ops.pointwise import add_bias
from mtaclip_jax.models.ops.pointwise import pointwise_conv
from mtaclip_jax.models.pixel_decoder import conv_init


def assert_same_as_flax(ref: nn.Module, mine: nn.Module, x: jax.Array) -> None:
  """Same variables from the same key and, with a non-zero bias, in float64 the same
  output and gradients (w.r.t. variables and input) as the flax layer `ref`."""
  v = ref.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, mine.init(jax.random.key(0), x), v)
  v = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.1, v)

  def loss(module, variables, inputs):
    out = module.apply(variables, inputs)
    return jnp.sum(jnp.cos(nn.relu(out) + out)), out

  grad = lambda m: jax.value_and_grad(functools.partial(loss, m), (0, 1), has_aux=True)
  (_, a), ga = grad(ref)(v, x)
  (_, b), gb = grad(mine)(v, x)
  assert b.shape == a.shape and b.dtype == jnp.float64
  np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(q, p, rtol=1e-11, atol=1e-11), ga, gb)


@pytest.mark.parametrize("use_bias", [True, False])
def test_pointwise_conv_is_a_1x1_convolution(use_bias):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 6), jnp.float64)
    assert_same_as_flax(
        nn.Conv(4, (1, 1), use_bias=use_bias, kernel_init=conv_init, dtype=jnp.float64),
        PointwiseConv(4, use_bias, jnp.float64, conv_init),
        x,
    )


def test_pointwise_conv_computes_in_its_dtype():
  x = jnp.ones((1, 2, 2, 3))
  mine = PointwiseConv(4, dtype=jnp.bfloat16)
  v = mine.init(jax.random.key(0), x)
  assert v["params"]["kernel"].dtype == jnp.float32
  assert mine.apply(v, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_is_nn_dense(use_bias):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 3, 7, 6), jnp.float64)
    assert_same_as_flax(
        nn.Dense(4, use_bias=use_bias, dtype=jnp.float64), Dense(4, use_bias, jnp.float64), x
    )


def test_add_bias_gradient_is_the_sum_over_positions():
  y = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  b = jnp.arange(4.0)
  g = jax.random.normal(jax.random.key(1), y.shape)
  out, vjp = jax.vjp(add_bias, y, b)
  np.testing.assert_array_equal(out, y + b)
  dy, db = vjp(g)
  np.testing.assert_array_equal(dy, g)
  np.testing.assert_allclose(db, g.sum((0, 1, 2)), rtol=1e-6, atol=1e-6)
  assert add_bias(y.astype(jnp.bfloat16), b).dtype == jnp.bfloat16


def test_pointwise_conv_skips_gradients_nobody_needs():
  """A frozen kernel gets no weight-gradient matmul, an input nobody differentiates no
  input-gradient one (as plain autodiff): counted in the traced program."""
  x, w = jnp.ones((8, 32)), jnp.ones((32, 64))
  fwd = 2 * 8 * 32 * 64
  count = lambda f, a: flops.jaxpr_flops(jax.jit(jax.grad(f)).trace(a).jaxpr)
  assert count(lambda x: jnp.sum(pointwise_conv(x, w) ** 2), x) == 2 * fwd
  assert count(lambda w: jnp.sum(pointwise_conv(x, w) ** 2), w) == 2 * fwd
  both = jax.jit(jax.grad(lambda x, w: jnp.sum(pointwise_conv(x, w) ** 2), (0, 1)))
  assert flops.jaxpr_flops(both.trace(x, w).jaxpr) == 3 * fwd
