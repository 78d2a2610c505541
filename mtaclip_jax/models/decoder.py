"""Mask-Text decoder (MTA-CLIP) = Mask2Former's masked-attention decoder whose
query set is extended by text queries built from CLIP text embeddings.

With `text_queries=False` it is transformers' `Mask2FormerTransformerModule` +
`class_predictor` (names mirrored: `queries_features`, `queries_embedder`,
`level_embed`, `layers_i/{cross_attn,self_attn,fc1,fc2,*_layer_norm}`,
`layernorm`, `mask_predictor/mask_embedder/layers_i`, `class_predictor`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtaclip_jax.models.pixel_decoder import resize_bilinear
from mtaclip_jax.models.pixel_decoder import sine_position_embedding

xavier = nn.initializers.xavier_uniform()


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name=name)


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def attention_blocked(masks: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Masked attention's block from mask logits [B, Q, H, W]: bilinearly resized
  to the memory level `size`, blocked where sigmoid < 0.5 -> [B, Q, h*w] bool.
  A query whose mask is empty at this level attends everywhere."""
  b, q = masks.shape[:2]
  small = jnp.moveaxis(masks.astype(jnp.float32), 1, -1)
  if small.shape[1:3] != tuple(size):
    small = resize_bilinear(small, size)
  blocked = jnp.moveaxis(jax.nn.sigmoid(small) < 0.5, -1, 1).reshape(b, q, -1)
  blocked = blocked & ~jnp.all(blocked, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(blocked)


# Decoder attention implementations (config.model.attention_impl): "xla" = einsums and an
# fp32 softmax; "cudnn" = jax.nn.dot_product_attention's cuDNN fused kernel (GPU, bf16 or
# fp16 only; never materialises the [B, heads, Lq, Lk] logits).
ATTENTION_IMPLS = ("xla", "cudnn")


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, blocked: jax.Array | None, implementation: str
) -> jax.Array:
  """`jax.nn.dot_product_attention` of q [B, Lq, N, Dh], k / v [B, Lk, N, Dh] with the
  block mask [B or 1, Lq, Lk] (True = may not attend) as an additive bias of the
  dtype's lowest value -> [B, Lq, N, Dh]."""
  bias = None
  if blocked is not None:
    low = jnp.asarray(jnp.finfo(q.dtype).min, q.dtype)
    bias = jnp.where(blocked[:, None], low, jnp.zeros((), q.dtype))
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, scale=q.shape[-1] ** -0.5, implementation=implementation
  )


class Attention(nn.Module):
  """Multi-head attention; `blocked` [B or 1, Lq, Lk] True = may not attend.
  Softmax in fp32 ("xla"; cuDNN's fused kernel accumulates in fp32 too)."""

  embed_dim: int = 256
  num_heads: int = 8
  dtype: jnp.dtype = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, query, key, value, blocked=None):
    dh = self.embed_dim // self.num_heads

    def proj(x, name):
      y = nn.Dense(self.embed_dim, kernel_init=xavier, dtype=self.dtype, name=name)(x)
      return y.reshape(y.shape[:2] + (self.num_heads, dh))

    q = proj(query, "q_proj")
    k = proj(key, "k_proj")
    v = proj(value, "v_proj")
    if self.impl == "cudnn":
      out = fused_attention(q, k, v, blocked, "cudnn")
    elif self.impl == "xla":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * (dh**-0.5), k).astype(jnp.float32)
      if blocked is not None:
        logits = jnp.where(blocked[:, None], -jnp.inf, logits)
      weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      raise ValueError(
          f"config.model.attention_impl must be one of {ATTENTION_IMPLS}, " f"got {self.impl!r}"
      )
    out = out.reshape(query.shape[:2] + (self.embed_dim,))
    return nn.Dense(self.embed_dim, kernel_init=xavier, dtype=self.dtype, name="out_proj")(out)


class DecoderLayer(nn.Module):
  """Masked cross-attention -> self-attention -> FFN, each post-norm."""

  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, query_pos, memory, memory_pos, cross_blocked, self_blocked):
    attn = Attention(
        self.hidden_dim, self.num_heads, self.dtype, self.attention_impl, name="cross_attn"
    )
    x = x + attn(x + query_pos, memory + memory_pos, memory, cross_blocked)
    x = _layer_norm("cross_attn_layer_norm")(x)
    q = x + query_pos
    attn = Attention(
        self.hidden_dim, self.num_heads, self.dtype, self.attention_impl, name="self_attn"
    )
    x = _layer_norm("self_attn_layer_norm")(x + attn(q, q, x, self_blocked))
    y = nn.relu(nn.Dense(self.ffn_dim, kernel_init=xavier, dtype=self.dtype, name="fc1")(x))
    y = nn.Dense(self.hidden_dim, kernel_init=xavier, dtype=self.dtype, name="fc2")(y)
    return _layer_norm("final_layer_norm")(x + y)


class MaskEmbedder(nn.Module):
  """MLP(hidden, hidden, mask_dim) with ReLU between layers."""

  hidden_dim: int = 256
  mask_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="layers_0")(x))
    x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="layers_1")(x))
    return nn.Dense(self.mask_dim, dtype=self.dtype, name="layers_2")(x)


class MaskTextDecoder(nn.Module):
  """Queries [mask queries, text queries] over the pixel decoder's memory.

  Call with the pixel decoder's `multi_scale_features` (NHWC, coarsest first),
  `mask_features` [B, h, w, mask_dim] and, with text queries, `text_embeddings`
  t0 [K, C+1, embed_dim]. Returns outputs stacked over the supervised layers:
  `logits` [L, B, Q, C+1] and `masks` [L, B, Q, h, w] (fp32) and, with text
  queries and `similarity_heads`, `m_proj` [L, B, Q, D] and `t_proj` [L, B, K, C+1, D]
  (L2-normalised: what the similarity loss and the similarity head compare);
  and the factors of the masks, `mask_embed` [L, B, Q, mask_dim] and (not stacked)
  `mask_features` [B, h, w, mask_dim]: masks = einsum(mask_embed, mask_features),
  through which the losses differentiate the matched masks only (objective/point_loss.py).
  """

  num_classes: int
  num_queries: int = 100
  hidden_dim: int = 256
  mask_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  num_layers: int = 9
  num_feature_levels: int = 3
  text_queries: bool = True
  # The similarity loss's projections (mask_clip_proj, text_clip_proj, text_clip_norm,
  # gamma); a model trained without that loss (Table 3's "+ Text-Enhanced") has none.
  similarity_heads: bool = True
  joint_self_attn: bool = True
  embed_dim: int = 1024
  num_contexts: int = 3
  gamma_init: float = 1e-4
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"

  def _predict(self, x, mask_features, size, small_features=None):
    """Shared head on all queries: (normed queries, class logits and mask logits of
    the mask queries, attention block of all queries at the next layer's level).

    Text queries need masks only for their attention block, which has no gradient.
    Bilinear resizing is linear, so `resize(e . F) = e . resize(F)`: their masks are
    made directly at the level size from `small_features` (the mask features resized
    once per level), which gives the same block as resizing stride-4 masks for a
    fraction of the FLOPs and no backward pass."""
    nq = self.num_queries
    normed = self.layernorm(x)
    logits = self.class_predictor(normed[:, :nq]).astype(jnp.float32)
    embed = self.mask_predictor(normed)
    masks = jnp.einsum("bqc,bhwc->bqhw", embed[:, :nq], mask_features).astype(jnp.float32)
    blocked = attention_blocked(masks, size)
    if small_features is not None:
      text = jnp.einsum("bqc,bhwc->bqhw", jax.lax.stop_gradient(embed[:, nq:]), small_features)
      blocked = jnp.concatenate([blocked, attention_blocked(text, text.shape[2:])], 1)
    return normed, logits, masks, embed[:, :nq], blocked

  def setup(self):
    ln = lambda: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32)
    self.layernorm = ln()
    self.class_predictor = nn.Dense(self.num_classes + 1, dtype=jnp.float32)
    self.mask_predictor = MaskEmbedder(self.hidden_dim, self.mask_dim, self.dtype)
    self.layers = [
        DecoderLayer(self.hidden_dim, self.num_heads, self.ffn_dim, self.dtype, self.attention_impl)
        for _ in range(self.num_layers)
    ]
    emb = nn.initializers.normal(1.0)
    self.queries_features = self.param("queries_features", emb, (self.num_queries, self.hidden_dim))
    self.queries_embedder = self.param("queries_embedder", emb, (self.num_queries, self.hidden_dim))
    self.level_embed = self.param("level_embed", emb, (self.num_feature_levels, self.hidden_dim))
    if self.text_queries:
      self.text_proj = nn.Dense(self.hidden_dim, dtype=jnp.float32)
      self.text_norm = ln()
      self.text_pos_embed = self.param(
          "text_pos_embed", emb, (self.num_text_queries, self.hidden_dim)
      )
    if self.has_similarity_heads:
      self.mask_clip_proj = nn.Dense(self.embed_dim, dtype=jnp.float32)
      self.text_clip_proj = nn.Dense(self.embed_dim, dtype=jnp.float32)
      self.text_clip_norm = ln()
      self.gamma = self.param("gamma", nn.initializers.constant(self.gamma_init), (self.embed_dim,))

  @property
  def has_similarity_heads(self) -> bool:
    return self.text_queries and self.similarity_heads

  @property
  def num_text_queries(self) -> int:
    return self.num_contexts * (self.num_classes + 1) if self.text_queries else 0

  def __call__(
      self,
      multi_scale_features: Sequence[jax.Array],
      mask_features: jax.Array,
      text_embeddings: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    nl = self.num_feature_levels
    if len(multi_scale_features) != nl:
      raise ValueError(f"decoder expects {nl} feature levels, got {len(multi_scale_features)}")
    b = mask_features.shape[0]
    memory, memory_pos, sizes = [], [], []
    for lvl, feat in enumerate(multi_scale_features):
      _, h, w, c = feat.shape
      if c != self.hidden_dim:
        raise ValueError(
            f"decoder memory level {lvl} has {c} channels, expected hidden_dim "
            f"{self.hidden_dim} (pixel decoder conv_dim must equal hidden_dim)"
        )
      sizes.append((h, w))
      memory.append(feat.reshape(b, h * w, c) + self.level_embed[lvl].astype(feat.dtype))
      pos = sine_position_embedding(h, w, self.hidden_dim // 2).reshape(1, h * w, c)
      memory_pos.append(jnp.asarray(pos, feat.dtype))

    x = jnp.broadcast_to(self.queries_features, (b,) + self.queries_features.shape)
    query_pos = jnp.broadcast_to(self.queries_embedder, x.shape)
    self_blocked = None
    if self.text_queries:
      if text_embeddings is None:
        raise ValueError("decoder built with text_queries=True needs text_embeddings [K, C+1, D]")
      k, c1, d = text_embeddings.shape
      if (k, c1, d) != (self.num_contexts, self.num_classes + 1, self.embed_dim):
        raise ValueError(
            f"text_embeddings shape {text_embeddings.shape}, expected "
            f"[{self.num_contexts}, {self.num_classes + 1}, {self.embed_dim}]"
        )
      t0 = text_embeddings.reshape(k * c1, d).astype(jnp.float32)
      t_hat = self.text_norm(self.text_proj(t0))
      text_pos = self.text_pos_embed
      x = jnp.concatenate([x, jnp.broadcast_to(t_hat, (b,) + t_hat.shape).astype(x.dtype)], 1)
      query_pos = jnp.concatenate([query_pos, jnp.broadcast_to(text_pos, (b,) + text_pos.shape)], 1)
      if not self.joint_self_attn:
        is_text = jnp.arange(x.shape[1]) >= self.num_queries
        self_blocked = (is_text[:, None] != is_text[None, :])[None]
    x = x.astype(self.dtype)
    query_pos = query_pos.astype(self.dtype)

    outs = {"logits": [], "masks": [], "mask_embed": [], "m_proj": [], "t_proj": []}

    def record(normed, logits, masks, embed):
      outs["logits"].append(logits)
      outs["masks"].append(masks)
      outs["mask_embed"].append(embed)
      if self.has_similarity_heads:
        m = self.mask_clip_proj(normed[:, : self.num_queries])
        t = self.text_clip_norm(self.text_clip_proj(normed[:, self.num_queries :]))
        outs["m_proj"].append(_l2_normalize(m))
        outs["t_proj"].append(_l2_normalize(t0 + self.gamma * t).reshape(b, k, c1, d))

    small = [None] * nl
    if self.text_queries:  # mask features at each level's size, for the text queries' blocks
      small = [
          jax.lax.stop_gradient(resize_bilinear(mask_features.astype(jnp.float32), size))
          for size in sizes
      ]
    normed, logits, masks, embed, blocked = self._predict(x, mask_features, sizes[0], small[0])
    if not self.text_queries:  # Mask2Former also supervises the query initialisation
      record(normed, logits, masks, embed)
    for i, layer in enumerate(self.layers):
      lvl = i % nl
      x = layer(x, query_pos, memory[lvl], memory_pos[lvl], blocked, self_blocked)
      nxt = (i + 1) % nl
      normed, logits, masks, embed, blocked = self._predict(
          x, mask_features, sizes[nxt], small[nxt]
      )
      record(normed, logits, masks, embed)
    out = {key: jnp.stack(v) for key, v in outs.items() if v}
    out["mask_features"] = mask_features
    return out
