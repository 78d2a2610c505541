"""PointwiseConv / pointwise_conv = nn.Conv(features, (1, 1)): same variables, and in
float64 the same output and gradients (its own weight gradient)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtaclip_jax.models.pixel_decoder import conv_init
from mtaclip_jax.models.pointwise import PointwiseConv


@pytest.mark.parametrize("use_bias", [True, False])
def test_pointwise_conv_is_a_1x1_convolution(use_bias):
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (2, 5, 7, 6), jnp.float64)
        conv = nn.Conv(4, (1, 1), use_bias=use_bias, kernel_init=conv_init,
                       dtype=jnp.float64)
        mine = PointwiseConv(4, use_bias, jnp.float64, conv_init)
        v = conv.init(jax.random.key(0), x)
        jax.tree.map(np.testing.assert_array_equal, mine.init(jax.random.key(0), x), v)
        v = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.1, v)  # a non-zero bias

        def loss(module, variables, images):
            out = module.apply(variables, images)
            return jnp.sum(jnp.cos(out)), out

        grad = lambda m: jax.value_and_grad(functools.partial(loss, m), (0, 1), has_aux=True)
        (_, a), ga = grad(conv)(v, x)
        (_, b), gb = grad(mine)(v, x)
        assert b.shape == (2, 5, 7, 4) and b.dtype == jnp.float64
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
        jax.tree.map(lambda p, q: np.testing.assert_allclose(q, p, rtol=1e-11, atol=1e-11),
                     ga, gb)


def test_pointwise_conv_computes_in_its_dtype():
    x = jnp.ones((1, 2, 2, 3))
    mine = PointwiseConv(4, dtype=jnp.bfloat16)
    v = mine.init(jax.random.key(0), x)
    assert v["params"]["kernel"].dtype == jnp.float32
    assert mine.apply(v, x).dtype == jnp.bfloat16
