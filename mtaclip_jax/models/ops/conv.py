"""2-D convolutions whose gradients XLA:CPU hands to its convolution library anywhere.

XLA:CPU runs a convolution through Eigen only in its canonical form (NHWC input, HWIO
kernel, NHWC output), and its pass that rewrites other forms into that one
(`ConvCanonicalization`) visits only the top-level computation. Autodiff writes the
input gradient (kernel as HWOI) and the weight gradient (batch as the contracted
feature) in other forms, so inside a loop body (the `lax.scan` of
`config.train.micro_batches`) they ran as XLA's generic loops: one 3x3 convolution's
forward and backward on [2, 64, 64, 256] took 20.7 s scanned against 0.41 s unscanned
(docs/BENCHMARKS.md, "What made the CPU step faster"). `conv2d` writes both gradients in
the canonical form itself (the kernel flipped and transposed; the weight gradient with
the input's channels as its batch), the same arithmetic as autodiff's; with it the
scanned case takes 0.37 s. Only on the CPU backend: elsewhere it is
`lax.conv_general_dilated`. `Conv2d` is `nn.Conv` (same variables, names, shapes and
initialisers) through it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtaclip_jax.models.ops.pointwise import add_bias_param

_DN = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _conv(x, w, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
  return jax.lax.conv_general_dilated(
      x,
      w,
      strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=_DN,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, w, strides, padding):
  return _conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
  # Symbolic zeros: no input gradient for images, no weight gradient for a frozen
  # kernel (as under plain autodiff); the shapes travel as zero-size arrays.
  shapes = (
      jnp.zeros(x.value.shape + (0,), x.value.dtype),
      jnp.zeros(w.value.shape + (0,), w.value.dtype),
  )
  return _conv(x.value, w.value, strides, padding), (
      x.value if w.perturbed else None,
      w.value if x.perturbed else None,
      shapes,
  )


def _bwd(strides, padding, residuals, g):
  x, w, (x_shape, w_shape) = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  size_in, size_out, kernel = x_shape.shape[1:3], g.shape[1:3], w_shape.shape[:2]
  # Input gradient: the output gradient dilated by the stride, convolved with the
  # kernel rotated by 180 degrees and its in/out features swapped (HWIO again).
  in_pad = []
  for n, m, k, s, (lo, _) in zip(size_in, size_out, kernel, strides, padding):
    before = k - 1 - lo
    in_pad.append((before, n + k - 2 - (m - 1) * s - before))
  dx = (
      None
      if w is None
      else _conv(g, jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3), (1, 1), in_pad, lhs_dilation=strides)
  )
  if x is None:
    return dx, None
  # Weight gradient: the input's channels as the batch ([I, H, W, B]) convolved with
  # the output gradient as the kernel ([Ho, Wo, B, O], dilated by the stride).
  w_pad = [
      (lo, k + (m - 1) * s - n - lo)
      for n, m, k, s, (lo, _) in zip(size_in, size_out, kernel, strides, padding)
  ]
  dw = _conv(
      jnp.transpose(x, (3, 1, 2, 0)),
      jnp.transpose(g, (1, 2, 0, 3)),
      (1, 1),
      w_pad,
      rhs_dilation=strides,
  )  # [I, kh, kw, O]
  return dx, jnp.transpose(dw, (1, 2, 0, 3))


_canonical_conv.defvjp(_fwd, _bwd, symbolic_zeros=True)


def _pairs(padding) -> Padding:
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv2d(
    x: jax.Array,
    w: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: int | Sequence[tuple[int, int]] = 0,
) -> jax.Array:
  """Images [B, H, W, I] by kernel [kh, kw, I, O] -> [B, Ho, Wo, O]; `padding` an int
  (both sides of both axes) or ((top, bottom), (left, right))."""
  strides, padding = tuple(int(s) for s in strides), _pairs(padding)
  if jax.default_backend() != "cpu":
    return _conv(x, w, strides, padding)
  return _canonical_conv(x, w, strides, padding)


class Conv2d(nn.Module):
  """`nn.Conv(features, kernel_size, strides, padding)` for 2-D NHWC images (same
  variables, names, shapes and initialisers) computed by `conv2d` in `dtype`."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Any = 0  # int or ((top, bottom), (left, right)); "VALID" = 0
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel",
        self.kernel_init,
        tuple(self.kernel_size) + (x.shape[-1], self.features),
        jnp.float32,
    )
    padding = 0 if self.padding == "VALID" else self.padding
    return add_bias_param(
        self, conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, padding)
    )
