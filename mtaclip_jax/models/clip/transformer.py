"""Transformer pieces shared by the CLIP image (ViT) and text towers.

Names mirror OpenAI CLIP's `clip/model.py` (`transformer.resblocks.N.attn`, `ln_1`,
`mlp.c_fc`...). The attention keeps PyTorch's packed `in_proj_weight` [3*width, width]
layout so that weight conversion is a plain copy.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from mtaclip_jax.models.ops.pointwise import Dense


def _at_least_f32(dtype):
  """The dtype norms and softmaxes compute in: float32, or float64 under x64."""
  return jnp.promote_types(dtype, jnp.float32)


def _mesh_spec(x, spec):
  """with_sharding_constraint(x, spec) under a mesh of several devices, else x."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, spec)


def _by_sequence(x):
  """x [B, ...] split over the "data" axis by sequence, as `text.shard_sequences`
  puts the prompts (B a multiple of it); unchanged without a "data" axis."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "data" not in mesh.axis_names:
    return x
  return _mesh_spec(x, P("data"))


def _replicated(x):
  """x on every device of the current mesh (unchanged without one). For the shared
  prompt prefix's keys and values, which every device's sequences attend to: left to
  propagation, they took the FSDP-sharded in-projection's layout and XLA warned of an
  "involuntary full rematerialization" to gather them by owner."""
  return _mesh_spec(x, P())


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (or wider) whatever the compute dtype (as CLIP's
  subclass).

  Params `scale`/`bias` directly under the module (torch `weight`/`bias`).
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    dtype = x.dtype
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    x = x.astype(_at_least_f32(dtype))
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch-first here), packed in-projection."""

  width: int
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x,
      mask: Optional[jax.Array] = None,
      query_index: Optional[jax.Array] = None,
      prefix=None,
  ):
    """x: [B, L, width]; mask: additive [L, L] (0 or -inf) or None. With
    query_index [B], only that position's query: -> [B, 1, width].

    prefix = (p [K, P, width], owner [B] int): causal attention over sequences whose
    first P tokens are shared, sequence b being p[owner[b]] followed by x[b] (x's
    positions are P.. of it; `mask` is not used). The shared part is projected and
    attended once per K instead of once per B. Returns (p's output [K, P, width] or
    None with query_index, x's output)."""
    w = self.width
    in_w = self.param(
        "in_proj_weight", nn.initializers.normal(w**-0.5), (3 * w, w), jnp.float32
    ).astype(self.dtype)
    in_b = self.param("in_proj_bias", nn.initializers.zeros, (3 * w,), jnp.float32).astype(
        self.dtype
    )
    out_proj = Dense(w, dtype=self.dtype, name="out_proj")
    x = x.astype(self.dtype)
    q, k, v = self._project(x, query_index, in_w, in_b)
    if prefix is None:
      if mask is not None and query_index is not None:
        mask = mask[query_index][:, None, None, :]  # [B, 1, 1, L]
      return out_proj(self._attend(q, k, v, mask))
    p, owner = prefix
    p = p.astype(self.dtype)
    n, s = p.shape[1], x.shape[1]
    qp, kp, vp = self._project(p, None, in_w, in_b)
    kp, vp = _replicated(kp), _replicated(vp)
    p_out = None  # the last block (query_index) only reads p
    own = causal_mask(s)  # x's positions among themselves
    if query_index is None:  # the shared part's own causal attention
      p_out = out_proj(self._attend(qp, kp, vp, causal_mask(n)))
    else:
      own = own[query_index][:, None, None, :]  # [B, 1, 1, S]
    # Each sequence attends to its shared part (all visible) and to x causally.
    keys = _by_sequence(jnp.concatenate([jnp.take(kp, owner, axis=0), k], axis=1))
    values = _by_sequence(jnp.concatenate([jnp.take(vp, owner, axis=0), v], axis=1))
    q = _by_sequence(q)
    mask = jnp.concatenate([jnp.zeros(own.shape[:-1] + (n,), own.dtype), own], axis=-1)
    return p_out, out_proj(_by_sequence(self._attend(q, keys, values, mask)))

  def _project(self, x, query_index, in_w, in_b):
    """The packed in-projection: [..., L, width] -> q, k, v [..., L, heads, head_dim]
    (q only at query_index [B] when given: [B, 1, heads, head_dim])."""
    w = self.width
    if query_index is None:
      q, k, v = jnp.split(jnp.einsum("...ld,ed->...le", x, in_w) + in_b, 3, axis=-1)
    else:
      rows = jnp.take_along_axis(x, query_index[:, None, None], axis=1)
      q = jnp.einsum("bld,ed->ble", rows, in_w[:w]) + in_b[:w]
      k, v = jnp.split(jnp.einsum("bld,ed->ble", x, in_w[w:]) + in_b[w:], 2, axis=-1)
    heads = lambda t: t.reshape(t.shape[:-1] + (self.heads, w // self.heads))
    return heads(q), heads(k), heads(v)

  def _attend(self, q, k, v, mask):
    """Scaled dot-product attention, softmax in float32 (or wider), additive mask
    broadcast to [..., heads, Lq, Lk] -> [..., Lq, width]."""
    scale = (self.width // self.heads) ** -0.5
    logits = jnp.einsum("...qhd,...khd->...hqk", q * scale, k).astype(_at_least_f32(q.dtype))
    if mask is not None:
      logits = logits + mask
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, v)
    return out.reshape(out.shape[:-2] + (self.width,))


class Mlp(nn.Module):
  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Dense(4 * self.width, dtype=self.dtype, name="c_fc")(x)
    x = quick_gelu(x)
    return Dense(self.width, dtype=self.dtype, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
  width: int
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, query_index=None, prefix=None):
    """With query_index [B]: only the output at that position, [B, 1, width]. With
    prefix (p, owner) (see MultiheadAttention): returns (p's output, x's output)."""
    ln_1, ln_2 = LayerNorm(name="ln_1"), LayerNorm(name="ln_2")
    attn = MultiheadAttention(self.width, self.heads, self.dtype, name="attn")
    mlp = Mlp(self.width, self.dtype, name="mlp")

    def residual(y, attended):
      y = y + attended
      return y + mlp(ln_2(y))

    if query_index is not None:
      pick = lambda y: jnp.take_along_axis(y, query_index[:, None, None], axis=1)
    else:
      pick = lambda y: y
    if prefix is None:
      return residual(pick(x), attn(ln_1(x), mask, query_index))
    p, owner = prefix
    p_attn, x_attn = attn(ln_1(x), None, query_index, prefix=(ln_1(p), owner))
    p = None if p_attn is None else residual(p, p_attn)
    return p, residual(pick(x), x_attn)


class Resblocks(nn.Module):
  """`transformer.resblocks`: blocks named "0".."layers-1"; returns every block output."""

  width: int
  layers: int
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, last_at=None, prefix=None):
    """last_at [B]: the last block computes only that position (its output
    [B, 1, width]); the others are whole. prefix: see MultiheadAttention (the
    outputs are x's; the shared part's is only carried to the next block)."""
    outputs = []
    for i in range(self.layers):
      at = last_at if i == self.layers - 1 else None
      block = ResidualAttentionBlock(self.width, self.heads, self.dtype, name=str(i))
      if prefix is None:
        x = block(x, mask, at)
      else:
        p, x = block(x, None, at, prefix=prefix)
        prefix = (p, prefix[1])
      outputs.append(x)
    return outputs


class Transformer(nn.Module):
  width: int
  layers: int
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, taps: Sequence[int] = (), last_at=None, prefix=None):
    """x [B, L, width] -> (final output, [outputs after the blocks listed in taps]).
    last_at [B]: the final output only at that position, [B, 1, width] (the text
    tower reads one token: its last block skips the others' queries and MLPs).
    prefix (p [K, P, width], owner [B]): causal sequences p[owner[b]] + x[b] whose
    shared first P tokens are computed once per K (see MultiheadAttention)."""
    outputs = Resblocks(self.width, self.layers, self.heads, self.dtype, name="resblocks")(
        x, mask, last_at, prefix
    )
    return outputs[-1], [outputs[i] for i in taps]


def causal_mask(length: int) -> jax.Array:
  """Additive mask: position i attends to positions <= i."""
  return jnp.asarray(np.triu(np.full((length, length), -np.inf, np.float32), 1))
