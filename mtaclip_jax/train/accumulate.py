"""Gradient accumulation: one optimizer step over `n` micro-batches.

`config.train.micro_batches = n` splits each step's batch into n micro-batches that
run one after the other (a `lax.scan`), so only one micro-batch's activations are
alive at a time: the recipe's batch on a device that cannot hold it (as big_vision's
accumulation). Not unrolled: XLA:CPU then keeps every micro-batch's activations alive
(batch 16 as 4 micro-batches asked for 26.9 GB). Inside the scan XLA:CPU runs the
models' convolutions through its convolution library only because they go through
`models/ops/conv.py` (docs/BENCHMARKS.md).

The step's loss and gradient are the whole batch's: every micro-batch loss is
normalised by the whole batch's counts (`losses.batch_normalizers`), so the
micro-batch losses add up to the whole batch's loss; only the random points differ
(each micro-batch draws its own). The prompted text tower runs once per step, not
once per micro-batch: its output t0 [K, C+1, D] comes from `jax.vjp`, each
micro-batch adds its gradient with respect to t0, and one backward pass through the
tower turns the sum into the contexts' gradient. Its cost stays fixed per step
whatever the batch (docs/BENCHMARKS.md).

Micro-batch i holds images i, i+n, i+2n, ...: each device's contiguous share of a
batch sharded over the data axis splits without moving data when the share is a
multiple of n (config/validate.py checks `batch_size % (n * data devices) == 0`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def split(batch: Any, n: int) -> Any:
  """Leaves [B, ...] -> [n, B/n, ...]; micro-batch i = images i, i+n, i+2n, ..."""

  def one(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into {n} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)

  return jax.tree.map(one, batch)


def value_and_grad(
    micro_loss: Callable,
    params: Any,
    micro_batches: Any,
    carry: Any,
    *,
    text_fn: Callable | None = None,
    text_params: Any = None,
):
  """Sums of loss, metrics and gradient over micro-batches.

  Args:
    micro_loss: `(params, t0, micro_batch, index, carry) -> (loss, (metrics, carry))`,
      differentiated with respect to `params` and `t0`.
    params: what the micro-batches differentiate (without `text_params`).
    micro_batches: pytree whose leaves have a leading axis n (`split`).
    carry: threaded through the micro-batches in order (BatchNorm statistics).
    text_fn: optional `text_params -> t0`, run once; None passes t0 = None.
    text_params: its differentiable input.

  Returns:
    `((loss, (metrics, carry)), (param_grads, text_param_grads))`, loss and metrics
    summed over the micro-batches; text_param_grads is None without `text_fn`.
  """
  t0, text_vjp = (None, None) if text_fn is None else jax.vjp(text_fn, text_params)
  grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 1), has_aux=True)
  n = jax.tree.leaves(micro_batches)[0].shape[0]
  first = jax.tree.map(lambda x: x[0], micro_batches)
  shapes = jax.eval_shape(grad_fn, params, t0, first, jnp.int32(0), carry)
  (_, (metric_shapes, _)), grad_shapes = shapes
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

  def body(acc, xs):
    loss_sum, metrics_sum, grads_sum, carry = acc
    micro_batch, index = xs
    (loss, (metrics, carry)), grads = grad_fn(params, t0, micro_batch, index, carry)
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    return (loss_sum + loss, add(metrics_sum, metrics), add(grads_sum, grads), carry), None

  init = (jnp.zeros((), jnp.float32), zeros(metric_shapes), zeros(grad_shapes), carry)
  (loss, metrics, (param_grads, t0_grad), carry), _ = jax.lax.scan(
      body, init, (micro_batches, jnp.arange(n, dtype=jnp.int32))
  )
  text_grads = None if text_vjp is None else text_vjp(t0_grad)[0]
  return (loss, (metrics, carry)), (param_grads, text_grads)
