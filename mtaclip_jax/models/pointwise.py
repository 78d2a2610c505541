"""1x1 stride-1 convolutions as matmuls, with a weight gradient XLA:CPU runs without
layout copies.

XLA:CPU computes a convolution's weight gradient as a convolution over the batch,
which first copies the activations to [C, H, W, B]; with the batch innermost that copy
runs at a few hundred MB/s and took ~1.7 of the 18 CPU-seconds of the baseline train
step (docs/BENCHMARKS.md, session 6). `pointwise_conv` contracts the flattened
positions of the activations and the output gradient in one matmul instead. Same
values as `nn.Conv(features, (1, 1))` to rounding; `PointwiseConv` has its variables.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


@jax.custom_vjp
def pointwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """Images [..., I] by kernel [I, O] -> [..., O]."""
    return jnp.einsum("...i,io->...o", x, w)


def _fwd(x, w):
    return pointwise_conv(x, w), (x, w)


def _bwd(residuals, g):
    x, w = residuals
    dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                             (((0,), (0,)), ((), ())))
    return jnp.einsum("...o,io->...i", g, w), dw


pointwise_conv.defvjp(_fwd, _bwd)


class PointwiseConv(nn.Module):
    """`nn.Conv(features, (1, 1))` (same variables, names, shapes and initialisers)
    computed by `pointwise_conv` in `dtype`."""
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            jnp.float32)
        y = pointwise_conv(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y
