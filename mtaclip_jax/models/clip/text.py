"""OpenAI CLIP text transformer, plus the learnable-context prompt path of MTA-CLIP.

Parameter paths mirror the text part of `clip/model.py`'s state dict:
`token_embedding/embedding` (torch `token_embedding.weight`), `positional_embedding`,
`transformer/resblocks/N/...`, `ln_final`, `text_projection`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mtaclip_jax.models.clip.transformer import LayerNorm
from mtaclip_jax.models.clip.transformer import Transformer
from mtaclip_jax.models.clip.transformer import causal_mask

CONTEXT_LENGTH = 8  # learnable context tokens per prompt (paper §4; docs/RECIPES.md)


def _data_axis_size() -> int:
  """Size of the "data" axis of the mesh set by `jax.set_mesh` (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "data" not in mesh.axis_names:
    return 1
  return mesh.shape["data"]


def shard_sequences(*arrays):
  """Pads arrays of N prompt sequences (leading axis) to a multiple of the "data" axis
  and splits them over it, so each device encodes N / devices prompts (their cost does
  not depend on the batch, so repeating them on every device would not scale).
  Returns the arrays and N."""
  n = arrays[0].shape[0]
  d = _data_axis_size()
  if d == 1:
    return (*arrays, n)
  pad = -n % d
  arrays = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in arrays]
  return (*(jax.lax.with_sharding_constraint(a, P("data")) for a in arrays), n)


class TextTransformer(nn.Module):
  """Methods: `encode_text(tokens [N, L])` and `encode_prompts(class_tokens [C', n],
  contexts [K, 8, width])`; `__call__` is `encode_text` (used by `init`)."""

  embed_dim: int
  context_length: int
  vocab_size: int
  width: int
  heads: int
  layers: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.token_embedding = nn.Embed(
        self.vocab_size,
        self.width,
        embedding_init=nn.initializers.normal(0.02),
        param_dtype=jnp.float32,
    )
    self.positional_embedding = self.param(
        "positional_embedding",
        nn.initializers.normal(0.01),
        (self.context_length, self.width),
        jnp.float32,
    )
    self.transformer = Transformer(self.width, self.layers, self.heads, self.dtype)
    self.ln_final = LayerNorm()
    self.text_projection = self.param(
        "text_projection",
        nn.initializers.normal(self.width**-0.5),
        (self.width, self.embed_dim),
        jnp.float32,
    )

  def __call__(self, tokens):
    return self.encode_text(tokens)

  def _encode(self, x, eot_index):
    """x [N, L, width] embedded sequence -> [N, embed_dim] at eot_index [N]."""
    length = x.shape[1]
    x = x + self.positional_embedding[:length].astype(self.dtype)[None]
    x, _ = self.transformer(x, mask=causal_mask(length), last_at=eot_index)
    x = x[:, 0]
    return self.ln_final(x) @ self.text_projection.astype(self.dtype)

  def encode_text(self, tokens):
    """tokens [N, L<=context_length] int32 (CLIP BPE ids) -> [N, embed_dim]. The
    features are taken at the end-of-text token (the largest id in each row)."""
    if tokens.shape[-1] > self.context_length:
      raise ValueError(
          f"tokens have length {tokens.shape[-1]} > context length " f"{self.context_length}"
      )
    x = self.token_embedding(tokens).astype(self.dtype)
    return self._encode(x, jnp.argmax(tokens, axis=-1))

  def encode_prompts(self, class_tokens, contexts):
    """class_tokens [C', n] ([SOT] name [EOT] pad, from `tokenize_class_names`),
    contexts [K, 8, width] -> [K, C', embed_dim].

    Sequence = [SOT] + 8 contexts + class_tokens[:, 1:]: length 8 + n (13 for n=5).
    The attention is causal, so the first 9 tokens ([SOT] + contexts, the same for
    every class: every row of class_tokens starts with [SOT]) have the same states in
    all C' sequences of a context: they are computed once per context and the C'
    sequences only for their n - 1 class tokens (4 of 13 tokens for n=5; equal to
    encoding the whole sequences up to rounding, tests/parity/test_clip_models.py)."""
    num_classes, n = class_tokens.shape
    k, ctx_len, width = contexts.shape
    if width != self.width:
      raise ValueError(f"contexts width {width} != text width {self.width}")
    if ctx_len + n > self.context_length:
      raise ValueError(f"prompt length {ctx_len + n} > context length " f"{self.context_length}")
    pos = self.positional_embedding[: ctx_len + n].astype(self.dtype)
    emb = self.token_embedding(class_tokens).astype(self.dtype)  # [C', n, width]
    sot = jnp.broadcast_to(emb[:1, :1], (k, 1, width))
    shared = (
        jnp.concatenate([sot, contexts.astype(self.dtype)], axis=1) + pos[: ctx_len + 1]
    )  # [K, 1 + ctx_len, width]
    names = jnp.tile(emb[:, 1:] + pos[ctx_len + 1 :], (k, 1, 1))  # [K * C', n - 1, w]
    eot = jnp.tile(jnp.argmax(class_tokens, axis=-1) - 1, k)  # within names
    owner = jnp.repeat(jnp.arange(k), num_classes)
    names, eot, owner, n_seq = shard_sequences(names, eot, owner)
    x, _ = self.transformer(names, last_at=eot, prefix=(shared, owner))
    x = self.ln_final(x[:, 0]) @ self.text_projection.astype(self.dtype)
    return x[:n_seq].reshape(k, num_classes, self.embed_dim)
