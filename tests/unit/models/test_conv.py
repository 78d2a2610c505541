"""Conv2d / conv2d = nn.Conv for 2-D NHWC images: same variables, in float64 the same
output and gradients (its own backward, written in XLA:CPU's canonical convolution
form), and every convolution of a scanned gradient is in that form."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops
from mtaclip_jax.models.ops.conv import Conv2d
from mtaclip_jax.models.ops.conv import conv2d
from tests.unit.models.test_pointwise import assert_same_as_flax

# (image size, kernel, stride, padding, bias): the shapes the backbones and the pixel
# decoder use (3x3 / 1, 3x3 / 2 on odd and even sizes, MiT's 7x7 / 4 patch embedding and
# 2x2 / 2 sequence reduction, a ViT's 4x4 / 4 patches).
CASES = [
    (9, 3, 1, 1, True),
    (9, 3, 2, 1, False),
    (10, 3, 2, 1, False),
    (13, 7, 4, 3, True),
    (8, 2, 2, 0, True),
    (12, 4, 4, 0, False),
]


@pytest.mark.parametrize("size,kernel,stride,pad,use_bias", CASES)
def test_conv2d_equals_nn_conv(size, kernel, stride, pad, use_bias):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, size, size + 1, 5), jnp.float64)
    ref = nn.Conv(
        4,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=jnp.float64,
    )
    mine = Conv2d(4, (kernel, kernel), (stride, stride), pad, use_bias=use_bias, dtype=jnp.float64)
    assert_same_as_flax(ref, mine, x)


def test_scanned_conv_gradients_are_canonical_on_cpu():
  """XLA:CPU canonicalises convolutions of the top-level computation only; inside a
  loop body its generic loops ran ~50x slower (models/conv.py). Ours must already be
  NHWC x HWIO -> NHWC without window reversal wherever they are."""
  x = jnp.ones((2, 2, 9, 9, 8))
  w = jnp.ones((3, 3, 8, 8))

  def step(w, x):
    def body(acc, xi):
      g = jax.grad(lambda w, xi: jnp.sum(conv2d(xi, w, (2, 2), 1) ** 2), (0, 1))(w, xi)
      return (acc[0] + g[0], acc[1] + jnp.sum(g[1])), None

    return jax.lax.scan(body, (jnp.zeros_like(w), 0.0), x)[0]

  hlo = jax.jit(step).lower(w, x).compile().as_text()
  convs = re.findall(r"= \S+ convolution\(.*", hlo)
  assert len(convs) == 3  # forward, input gradient, weight gradient
  for line in convs:
    assert "dim_labels=b01f_01io->b01f" in line, line
    assert "rhs_reversal" not in line, line


def test_conv2d_computes_in_its_dtype():
  x = jnp.ones((1, 4, 4, 3))
  mine = Conv2d(4, (3, 3), padding=1, dtype=jnp.bfloat16)
  v = mine.init(jax.random.key(0), x)
  assert v["params"]["kernel"].dtype == jnp.float32
  assert mine.apply(v, x).dtype == jnp.bfloat16
  g = jax.grad(lambda v: jnp.sum(mine.apply(v, x).astype(jnp.float32)))(v)
  assert g["params"]["kernel"].dtype == jnp.float32


def test_conv2d_skips_gradients_nobody_needs():
  """Patch embeddings: no input gradient for the images; a frozen kernel: no weight
  gradient (counted in the traced program)."""
  images, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((4, 4, 3, 16))
  fwd = 2 * 2 * 2 * 2 * 16 * 4 * 4 * 3
  loss = lambda im, k: jnp.sum(conv2d(im, k, (4, 4), 0) ** 2)
  count = lambda argnums: flops.jaxpr_flops(
      jax.jit(jax.grad(loss, argnums)).trace(images, kernel).jaxpr
  )
  assert count(1) == 2 * fwd
  assert count(0) == 2 * fwd
  assert count((0, 1)) == 3 * fwd
