"""OpenAI CLIP text transformer, plus the learnable-context prompt path of MTA-CLIP.

Parameter paths mirror the text part of `clip/model.py`'s state dict:
`token_embedding/embedding` (torch `token_embedding.weight`), `positional_embedding`,
`transformer/resblocks/N/...`, `ln_final`, `text_projection`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mtaclip_jax.models.clip_transformer import LayerNorm, Transformer, causal_mask

CONTEXT_LENGTH = 8  # learnable context tokens per prompt (DESIGN §3)


def _data_axis_size() -> int:
    """Size of the "data" axis of the mesh set by `jax.set_mesh` (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "data" not in mesh.axis_names:
        return 1
    return mesh.shape["data"]


def shard_sequences(x, eot):
    """Pads the N prompt sequences to a multiple of the "data" axis and splits them over
    it, so each device encodes N / devices prompts (their cost does not depend on the
    batch, so repeating them on every device would not scale). Returns x, eot, N."""
    n = x.shape[0]
    d = _data_axis_size()
    if d == 1:
        return x, eot, n
    pad = -n % d
    x = jnp.pad(x, ((0, pad), (0, 0), (0, 0)))
    eot = jnp.pad(eot, (0, pad))
    x = jax.lax.with_sharding_constraint(x, P("data"))
    eot = jax.lax.with_sharding_constraint(eot, P("data"))
    return x, eot, n


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
        self.token_embedding = nn.Embed(self.vocab_size, self.width,
                                        embedding_init=nn.initializers.normal(0.02),
                                        param_dtype=jnp.float32)
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(0.01),
            (self.context_length, self.width), jnp.float32)
        self.transformer = Transformer(self.width, self.layers, self.heads, self.dtype)
        self.ln_final = LayerNorm()
        self.text_projection = self.param(
            "text_projection", nn.initializers.normal(self.width ** -0.5),
            (self.width, self.embed_dim), jnp.float32)

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
            raise ValueError(f"tokens have length {tokens.shape[-1]} > context length "
                             f"{self.context_length}")
        x = self.token_embedding(tokens).astype(self.dtype)
        return self._encode(x, jnp.argmax(tokens, axis=-1))

    def encode_prompts(self, class_tokens, contexts):
        """class_tokens [C', n] ([SOT] name [EOT] pad, from `tokenize_class_names`),
        contexts [K, 8, width] -> [K, C', embed_dim].

        Sequence = [SOT] + 8 contexts + class_tokens[:, 1:]: length 8 + n (13 for n=5)."""
        num_classes, n = class_tokens.shape
        k, ctx_len, width = contexts.shape
        if width != self.width:
            raise ValueError(f"contexts width {width} != text width {self.width}")
        if ctx_len + n > self.context_length:
            raise ValueError(f"prompt length {ctx_len + n} > context length "
                             f"{self.context_length}")
        emb = self.token_embedding(class_tokens).astype(self.dtype)  # [C', n, width]
        sot = jnp.broadcast_to(emb[None, :, :1], (k, num_classes, 1, width))
        names = jnp.broadcast_to(emb[None, :, 1:], (k, num_classes, n - 1, width))
        ctx = jnp.broadcast_to(contexts.astype(self.dtype)[:, None],
                               (k, num_classes, ctx_len, width))
        x = jnp.concatenate([sot, ctx, names], axis=2).reshape(k * num_classes, ctx_len + n,
                                                                width)
        eot = jnp.argmax(class_tokens, axis=-1) + ctx_len  # SOT stays at 0, names shift
        eot = jnp.tile(eot, k)
        x, eot, n_seq = shard_sequences(x, eot)
        return self._encode(x, eot)[:n_seq].reshape(k, num_classes, self.embed_dim)
