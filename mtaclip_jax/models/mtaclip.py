"""The full MTA-CLIP model (docs/CONTRACT.md): image tower (a registered backbone,
mtaclip_jax/models/backbones/) -> MSDeformAttn pixel decoder -> Mask-Text decoder,
with text queries from the frozen CLIP text tower on learnable contexts.
`text_queries=False` is the Mask2Former baseline (no text tower, no contexts).

    model = build_model(config.model)
    variables = model.init(rng, images, class_tokens)
    out = model.apply(variables, images, class_tokens, train=False)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtaclip_jax.models import backbones
from mtaclip_jax.models import clip
from mtaclip_jax.models import decoder as decoder_lib
from mtaclip_jax.models.decoder import MaskTextDecoder
from mtaclip_jax.models.pixel_decoder import PixelDecoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Initialisers of the learnable prompt contexts (docs/RECIPES.md): "normal" as CoOp
# (std 0.02); "trunc_normal" as PyTorch's trunc_normal_ defaults (std 1, cut at +-2),
# which the released MTA-CLIP code uses.
CONTEXT_INITS = {
    "normal": nn.initializers.normal(0.02),
    "trunc_normal": nn.initializers.truncated_normal(1.0, lower=-2.0, upper=2.0),
}


class MTACLIP(nn.Module):
  """`(images [B,H,W,3] normalised, class_tokens [C+1, class_length] int32,
  train=False) -> {"logits", "masks"[, "m_proj", "t_proj"]}` stacked over the
  supervised layers (see docs/CONTRACT.md). BatchNorm statistics live in
  `batch_stats`; with train=True pass mutable=["batch_stats"] (a ViT's adapters and a
  ResNet with backbone_norm="bn" update them)."""

  backbone: str = "RN50"
  text_encoder: str = "RN50"
  backbone_norm: str = "frozen_bn"
  adapter_norm: str = "group"  # ViT backbones' FPN adapters (clip.vit.ADAPTER_NORMS)
  num_classes: int = 150
  num_queries: int = 100
  hidden_dim: int = 256
  mask_dim: int = 256
  enc_layers: int = 6
  enc_ffn_dim: int = 1024
  enc_heads: int = 8
  enc_points: int = 4
  num_feature_levels: int = 3
  dec_layers: int = 9
  dec_ffn_dim: int = 2048
  dec_heads: int = 8
  text_queries: bool = True
  # With text queries, the heads of the similarity loss (decoder/mask_clip_proj,
  # text_clip_proj, text_clip_norm, gamma) and the outputs m_proj / t_proj.
  similarity_heads: bool = True
  joint_self_attn: bool = True
  num_contexts: int = 3
  context_length: int = 8
  deform_attn_impl: str = "gather"
  attention_impl: str = "xla"
  gamma_init: float = 1e-4
  context_init: str = "normal"  # one of CONTEXT_INITS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      images: jax.Array,
      class_tokens: jax.Array | None = None,
      train: bool = False,
      text_embeddings: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    feats = backbones.get(self.backbone).build(
        dtype=self.dtype, norm=self.backbone_norm, adapter_norm=self.adapter_norm, name="backbone"
    )(images, train=train)
    pix = PixelDecoder(
        conv_dim=self.hidden_dim,
        mask_dim=self.mask_dim,
        enc_layers=self.enc_layers,
        enc_ffn_dim=self.enc_ffn_dim,
        enc_heads=self.enc_heads,
        enc_points=self.enc_points,
        num_feature_levels=self.num_feature_levels,
        deform_attn_impl=self.deform_attn_impl,
        dtype=self.dtype,
        name="pixel_decoder",
    )(feats)
    text_arch = clip.get_arch(self.text_encoder)
    t0 = None
    if self.text_queries and text_embeddings is not None:
      # Precomputed by `encode_classes` (inference: once per class list).
      want = (self.num_contexts, self.num_classes + 1, text_arch.embed_dim)
      if tuple(text_embeddings.shape) != want:
        raise ValueError(
            f"text_embeddings must be [K, C+1, D] = {list(want)}, got "
            f"{list(text_embeddings.shape)}"
        )
      t0 = text_embeddings.astype(jnp.float32)
    elif self.text_queries:
      if (
          class_tokens is None
          or class_tokens.ndim != 2
          or class_tokens.shape[0] != self.num_classes + 1
      ):
        raise ValueError(
            f"class_tokens must be [num_classes + 1 = {self.num_classes + 1}, length] "
            f"(class names + 'none'), got {None if class_tokens is None else class_tokens.shape}"
        )
      contexts = self.param(
          "contexts",
          CONTEXT_INITS[self.context_init],
          (self.num_contexts, self.context_length, text_arch.text_width),
      )
      # The text tower is frozen by the optimizer (lr x0), not by stop_gradient:
      # gradients must reach the contexts through it.
      t0 = clip.TextEncoder(text_arch, dtype=self.dtype, name="text_encoder").encode_prompts(
          class_tokens, contexts
      )
      t0 = t0.astype(jnp.float32)
    decoder = MaskTextDecoder(
        num_classes=self.num_classes,
        num_queries=self.num_queries,
        hidden_dim=self.hidden_dim,
        mask_dim=self.mask_dim,
        num_heads=self.dec_heads,
        ffn_dim=self.dec_ffn_dim,
        num_layers=self.dec_layers,
        num_feature_levels=self.num_feature_levels,
        text_queries=self.text_queries,
        similarity_heads=self.similarity_heads,
        joint_self_attn=self.joint_self_attn,
        embed_dim=text_arch.embed_dim,
        num_contexts=self.num_contexts,
        gamma_init=self.gamma_init,
        dtype=self.dtype,
        attention_impl=self.attention_impl,
        name="decoder",
    )
    return decoder(pix["multi_scale_features"], pix["mask_features"], t0)


def encode_classes(model: MTACLIP, variables, class_tokens: jax.Array) -> jax.Array | None:
  """The text queries' CLIP embeddings t0 `[K, C+1, D]` float32 (None for the baseline).

  They depend only on the text tower, the contexts and the class names, not on the
  images: inference computes them once per class list and passes them as
  `model.apply(..., text_embeddings=t0)`, which skips the text tower (in training the
  contexts change every step, so `__call__` encodes them itself)."""
  if not model.text_queries:
    return None
  params = variables["params"]
  t0 = clip.TextEncoder(clip.get_arch(model.text_encoder), dtype=model.dtype).apply(
      {"params": params["text_encoder"]},
      jnp.asarray(class_tokens, jnp.int32),
      params["contexts"],
      method="encode_prompts",
  )
  return t0.astype(jnp.float32)


def build_model(model_config) -> MTACLIP:
  """`config.model` (ml_collections.ConfigDict or dict) -> MTACLIP. The values are
  the user's to get right: config/validate.py checks them, with one-line errors,
  before any entry point builds the model; here they are only asserted."""
  c = dict(model_config)
  dtype = c.get("dtype", "float32")
  backbone = c.get("backbone", "RN50")
  assert dtype in DTYPES, dtype
  assert backbone in backbones.REGISTRY, backbone
  text_encoder = c.get("text_encoder") or backbones.get(backbone).default_text_encoder
  assert text_encoder in clip.ARCHS, text_encoder
  assert "num_classes" in c, "config.model.num_classes is required"
  fields = (
      "backbone_norm",
      "adapter_norm",
      "num_queries",
      "hidden_dim",
      "mask_dim",
      "enc_layers",
      "enc_ffn_dim",
      "enc_heads",
      "enc_points",
      "num_feature_levels",
      "dec_layers",
      "dec_ffn_dim",
      "dec_heads",
      "text_queries",
      "similarity_heads",
      "joint_self_attn",
      "num_contexts",
      "context_length",
      "deform_attn_impl",
      "attention_impl",
      "gamma_init",
      "context_init",
  )
  assert c.get("context_init", "normal") in CONTEXT_INITS, c["context_init"]
  assert c.get("attention_impl", "xla") in decoder_lib.ATTENTION_IMPLS, c["attention_impl"]
  kwargs = {k: c[k] for k in fields if k in c}
  return MTACLIP(
      backbone=backbone,
      text_encoder=text_encoder,
      num_classes=int(c["num_classes"]),
      dtype=DTYPES[dtype],
      **kwargs,
  )
