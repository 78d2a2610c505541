"""OpenAI CLIP text transformer, plus the learnable-context prompt path of MTA-CLIP.

Parameter paths mirror the text part of `clip/model.py`'s state dict:
`token_embedding/embedding` (torch `token_embedding.weight`), `positional_embedding`,
`transformer/resblocks/N/...`, `ln_final`, `text_projection`.
"""
import flax.linen as nn
import jax.numpy as jnp

from mtaclip_jax.models.clip_transformer import LayerNorm, Transformer, causal_mask

CONTEXT_LENGTH = 8  # learnable context tokens per prompt (DESIGN §3)


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
        x, _ = self.transformer(x, mask=causal_mask(length))
        x = jnp.take_along_axis(x, eot_index[:, None, None], axis=1)[:, 0]
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
        return self._encode(x, eot).reshape(k, num_classes, self.embed_dim)
