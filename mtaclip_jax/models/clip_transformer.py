"""Transformer pieces shared by the CLIP image (ViT) and text towers.

Names mirror OpenAI CLIP's `clip/model.py` (`transformer.resblocks.N.attn`, `ln_1`,
`mlp.c_fc`...). The attention keeps PyTorch's packed `in_proj_weight` [3*width, width]
layout so that weight conversion is a plain copy.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtaclip_jax.models.pointwise import Dense


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype (as CLIP's subclass).

    Params `scale`/`bias` directly under the module (torch `weight`/`bias`).
    """
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        dtype = x.dtype
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        x = x.astype(jnp.float32)
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
    def __call__(self, x, mask: Optional[jax.Array] = None,
                 query_index: Optional[jax.Array] = None):
        """x: [B, L, width]; mask: additive [L, L] (0 or -inf) or None. With
        query_index [B], only that position's query: -> [B, 1, width]."""
        w = self.width
        in_w = self.param("in_proj_weight", nn.initializers.normal(w ** -0.5), (3 * w, w),
                          jnp.float32).astype(self.dtype)
        in_b = self.param("in_proj_bias", nn.initializers.zeros, (3 * w,),
                          jnp.float32).astype(self.dtype)
        x = x.astype(self.dtype)
        b, l, _ = x.shape
        if query_index is None:
            qkv = jnp.einsum("bld,ed->ble", x, in_w) + in_b
            q, k, v = jnp.split(qkv, 3, axis=-1)
        else:
            rows = jnp.take_along_axis(x, query_index[:, None, None], axis=1)
            q = jnp.einsum("bld,ed->ble", rows, in_w[:w]) + in_b[:w]
            k, v = jnp.split(jnp.einsum("bld,ed->ble", x, in_w[w:]) + in_b[w:], 2, axis=-1)
            if mask is not None:
                mask = mask[query_index][:, None, None, :]  # [B, 1, 1, L]
        hd = w // self.heads
        q = q.reshape(b, q.shape[1], self.heads, hd)
        k, v = (t.reshape(b, l, self.heads, hd) for t in (k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k).astype(jnp.float32)
        if mask is not None:
            logits = logits + mask
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, q.shape[1], w)
        return Dense(w, dtype=self.dtype, name="out_proj")(out)


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
    def __call__(self, x, mask=None, query_index=None):
        """With query_index [B]: only the output at that position, [B, 1, width]."""
        attn = MultiheadAttention(self.width, self.heads, self.dtype, name="attn")(
            LayerNorm(name="ln_1")(x), mask, query_index)
        if query_index is not None:
            x = jnp.take_along_axis(x, query_index[:, None, None], axis=1)
        x = x + attn
        x = x + Mlp(self.width, self.dtype, name="mlp")(LayerNorm(name="ln_2")(x))
        return x


class Resblocks(nn.Module):
    """`transformer.resblocks`: blocks named "0".."layers-1"; returns every block output."""
    width: int
    layers: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, last_at=None):
        """last_at [B]: the last block computes only that position (its output
        [B, 1, width]); the others are whole."""
        outputs = []
        for i in range(self.layers):
            at = last_at if i == self.layers - 1 else None
            x = ResidualAttentionBlock(self.width, self.heads, self.dtype, name=str(i))(
                x, mask, at)
            outputs.append(x)
        return outputs


class Transformer(nn.Module):
    width: int
    layers: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, taps: Sequence[int] = (), last_at=None):
        """x [B, L, width] -> (final output, [outputs after the blocks listed in taps]).
        last_at [B]: the final output only at that position, [B, 1, width] (the text
        tower reads one token: its last block skips the others' queries and MLPs)."""
        outputs = Resblocks(self.width, self.layers, self.heads, self.dtype,
                            name="resblocks")(x, mask, last_at)
        return outputs[-1], [outputs[i] for i in taps]


def causal_mask(length: int) -> jax.Array:
    """Additive mask: position i attends to positions <= i."""
    return jnp.asarray(np.triu(np.full((length, length), -np.inf, np.float32), 1))
