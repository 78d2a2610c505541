"""Matmul and convolution FLOPs of a traced program, counted from its jaxpr.

The same number on every backend (XLA:GPU's cost analysis returned 0 for our lowered
train step on an H200, and its compiled program's analysis leaves out what it hands
to cuBLAS/cuDNN), and the convention of model-FLOP utilisation: 2 x multiply-adds of
every `dot_general` and `conv_general_dilated`, elementwise work not counted. Loops
count their body times their trip count (`scan`; XLA's cost analysis counts a loop
body once, which is most of the ~1% by which it falls short of this count for our
step: the matcher's 10-layer `lax.map` of cost matmuls is ~6 GFLOP at batch 2); a
`while` of unknown trip count counts its body once, a `cond` its most expensive branch.
A convolution counts the kernel taps that land on its input, not those on padding
(as XLA's cost analysis; this matters for input gradients, transposed convolutions
over a padded input).
"""

from __future__ import annotations

import math

from jax.extend import core
import numpy as np


def _dot_flops(eqn) -> int:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  # Every output element is a sum over the contracted dimensions.
  return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _taps_on_input(
    size: int, out: int, kernel: int, stride: int, pad_lo: int, lhs_dilation: int, rhs_dilation: int
) -> int:
  """(output position, kernel tap) pairs of one spatial axis that land on an input
  element (not on padding, nor between the elements of a dilated input)."""
  pos = np.arange(out)[:, None] * stride - pad_lo + np.arange(kernel)[None, :] * rhs_dilation
  hit = (pos >= 0) & (pos <= (size - 1) * lhs_dilation) & (pos % lhs_dilation == 0)
  return int(hit.sum())


def _conv_flops(eqn) -> int:
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  # Each output element sums over the kernel's input features (already divided by
  # feature_group_count; batch_group_count, as in weight gradients, leaves that
  # unchanged) and over its spatial taps that land on the input.
  per_axis = [
      _taps_on_input(lhs[ld], out[od], rhs[rd], stride, lo, ldil, rdil)
      for ld, od, rd, stride, (lo, _), ldil, rdil in zip(
          dn.lhs_spec[2:],
          dn.out_spec[2:],
          dn.rhs_spec[2:],
          p["window_strides"],
          p["padding"],
          p["lhs_dilation"],
          p["rhs_dilation"],
      )
  ]
  return 2 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]] * math.prod(per_axis)


def _sub_jaxprs(value):
  if isinstance(value, core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> int:
  """Matmul + convolution FLOPs of a (closed) jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total
