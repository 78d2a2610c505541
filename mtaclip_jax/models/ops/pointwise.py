"""1x1 stride-1 convolutions as matmuls, with a weight gradient XLA:CPU runs without
layout copies.

XLA:CPU computes a convolution's weight gradient as a convolution over the batch, which
first copies the activations to [C, H, W, B]; with the batch innermost that copy runs at
a few hundred MB/s and took ~1.7 of the 18 CPU-seconds of the baseline train step
(docs/BENCHMARKS.md, "What made the CPU step faster"). `pointwise_conv` contracts the
flattened positions of the activations and the output gradient in one matmul instead.
Same values as `nn.Conv(features, (1, 1))` to rounding; `PointwiseConv` has its
variables.

`add_bias` (used by the layers here, `conv.Conv2d` and the CLIP ResNet's folded BN): on
XLA:CPU a bias gradient, the sum of the output gradient over every position, ran as a
column reduction fused with the ReLU's backward select (a `reduce-window` of 30-39 ms
for [2, 5376, 1024]); ~0.55 of the baseline step's 16 CPU-seconds went to such sums
(docs/BENCHMARKS.md, "What made the CPU step faster"). On CPU its gradient is the sum of
the output gradient flattened to [positions, C] behind an `optimization_barrier` (not
fused, not a `reduce-window`); elsewhere it is `y + b`. `Dense` is `nn.Dense` through
both.
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
  # Symbolic zeros: keep only what a needed gradient reads (a frozen kernel, e.g. the
  # text tower's, gets no weight gradient, as under plain autodiff).
  out = pointwise_conv(x.value, w.value)
  return out, (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _bwd(residuals, g):
  x, w = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  dx = None if w is None else jnp.einsum("...o,io->...i", g, w)
  dw = (
      None
      if x is None
      else jax.lax.dot_general(
          x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ()))
      )
  )
  return dx, dw


pointwise_conv.defvjp(_fwd, _bwd, symbolic_zeros=True)


@jax.custom_vjp
def _add_bias_colsum(y, b):
  return y + b


def _bias_fwd(y, b):
  return y + b, None


def _bias_bwd(_, g):
  rows = jax.lax.optimization_barrier(g.reshape(-1, g.shape[-1]))
  return g, jnp.sum(rows, 0)


_add_bias_colsum.defvjp(_bias_fwd, _bias_bwd)


def add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
  """y [..., C] + b [C] in y's dtype; on CPU the bias gradient is the module doc's
  2-D sum."""
  b = b.astype(y.dtype)
  if jax.default_backend() != "cpu":
    return y + b
  return _add_bias_colsum(y, b)


def add_bias_param(module: nn.Module, y: jax.Array) -> jax.Array:
  """y plus `module`'s "bias" parameter (`module.features`, `module.bias_init`, as
  flax's layers) through `add_bias`, when `module.use_bias`; call from a compact
  method."""
  if not module.use_bias:
    return y
  bias = module.param("bias", module.bias_init, (module.features,), jnp.float32)
  return add_bias(y, bias)


class Dense(nn.Module):
  """`nn.Dense(features)` (same variables, names, shapes and initialisers) computed by
  `pointwise_conv` and `add_bias` in `dtype`."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  kernel_lead = ()  # leading kernel dimensions, not a field

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", self.kernel_init, self.kernel_lead + (x.shape[-1], self.features), jnp.float32
    )
    kernel = kernel.reshape(kernel.shape[-2:]).astype(self.dtype)
    return add_bias_param(self, pointwise_conv(x.astype(self.dtype), kernel))


class PointwiseConv(Dense):
  """`nn.Conv(features, (1, 1))` (same variables, names, shapes and initialisers):
  `Dense` with a [1, 1, I, O] kernel."""

  kernel_lead = (1, 1)
