"""Building blocks of the configs in configs/: the paper recipes and their variants.

Each file in configs/ is one paper row and calls `paper_config(dataset, backbone,
arg)`. The `arg` string selects ablations (big_vision style), e.g.
`configs/ade20k_r50.py:baseline` or `configs/ade20k_r50.py:K=5,neg=separate`.
"""

from __future__ import annotations

import ml_collections

from mtaclip_jax.config import variants
from mtaclip_jax.models import backbones

# The paper recipes (docs/RECIPES.md). Values follow the authors' released config (lr
# 1e-4; the paper says 2e-4).
RECIPES = {
    "ade20k": dict(
        crop=(512, 512),
        batch=16,
        steps=160_000,
        test_scale=(2048, 512),
        num_classes=150,
        max_segments=64,
        slide_stride=(341, 341),
    ),
    "cityscapes": dict(
        crop=(1024, 1024),
        batch=8,
        steps=90_000,
        test_scale=(2048, 1024),
        num_classes=19,
        max_segments=24,
        slide_stride=(683, 683),
    ),
}

# Regexes over "/"-joined parameter paths (see docs/CONTRACT.md for the top level).
LR_MULT_RULES = (
    (r"^text_encoder/", 0.0),  # frozen CLIP text tower
    # The image towers' image-level heads, which segmentation never reads (CLIP
    # ResNets' attention pool, CLIP ViT's ln_post/proj, the ImageNet ViT's final
    # layernorm): no gradient reaches them, so they are frozen, as PyTorch's AdamW
    # skips a parameter without a gradient (tests/unit/models/test_backbones.py checks that this
    # is exactly the set of unreached parameters of every registered backbone).
    (r"^backbone/(attnpool|ln_post|proj|layernorm)(/|$)", 0.0),
    (r"^backbone/", 0.1),
    (r"^contexts$", 1.0),
)
# No weight decay for norms, embeddings, queries, level embeddings, gamma, contexts.
NO_DECAY_RULES = (
    r"(^|/)(ln|bn|norm|gn|layernorm|layer_norm)[^/]*/(scale|bias)$",
    r"(^|/)[^/]*norm[^/]*/(scale|bias)$",
    r"(^|/)[^/]*(embed|embedding|embeddings)[^/]*(/embedding)?$",
    r"(^|/)(query_feat|query_embed|query_features|query_position|level_embed)[^/]*(/embedding)?$",
    r"(^|/)[^/]*(query|queries)[^/]*/embedding$",
    r"(^|/)(queries_features|queries_embedder|text_pos_embed)$",
    r"(^|/)cls_token$",  # class token of the ImageNet ViT (position embeddings: above)
    r"^backbone/fpn1/1/(scale|bias)$",  # BatchNorm of the ViT FPN adapter
    r"/downsample/1/(scale|bias)$",  # BatchNorm of the ResNet downsample branch
    r"(^|/)gamma$",
    r"^contexts$",
)


def train_transforms(crop_size, scale, ratio_range=(0.5, 2.0), cat_max_ratio=0.75):
  """The training augmentation of the paper recipes (mmsegmentation's ADE20k/Cityscapes
  pipelines): random resize, crop, flip, photometric distortion, normalise, pad."""
  return [
      f"random_resize(scale={tuple(scale)}, ratio_range={tuple(ratio_range)})",
      f"random_crop(size={tuple(crop_size)}, cat_max_ratio={cat_max_ratio})",
      "random_flip(prob=0.5)",
      "photometric_distortion()",
      "normalize()",
      f"pad(size={tuple(crop_size)})",
  ]


def data_config(name, root, **overrides):
  """ConfigDict with every `config.data` field, recipe defaults for dataset `name`."""
  r = RECIPES[name]
  cfg = ml_collections.ConfigDict(
      dict(
          name=name,
          root=root,
          source="raw",
          tfds_dir="",
          num_classes=r["num_classes"],
          crop_size=r["crop"],
          test_scale=r["test_scale"],
          batch_size=r["batch"],
          max_segments=32,
          transforms=train_transforms(r["crop"], r["test_scale"]),
          num_workers=0,
          num_threads=2,
          prefetch=4,
          seed=0,
          on_bad_sample="error",
      )
  )
  cfg.update(overrides)
  if "crop_size" in overrides and "transforms" not in overrides:
    cfg.transforms = train_transforms(cfg.crop_size, cfg.test_scale)
  return cfg


# The demo's model (configs/demo.py), also what a folder config with `backbone=tiny`
# trains: a tiny backbone and text tower with a small pixel decoder and decoder, for a
# CPU in minutes.
DEMO_MODEL = dict(
    # Running statistics, as the demo was tuned with (the paper recipes normalise the
    # CLIP ResNets with batch statistics, as the released code does).
    backbone_norm="frozen_bn",
    num_queries=16,
    hidden_dim=64,
    mask_dim=64,
    enc_layers=2,
    enc_ffn_dim=128,
    enc_heads=4,
    enc_points=4,
    dec_layers=3,
    dec_ffn_dim=128,
    dec_heads=4,
    num_contexts=2,
    context_init="normal",
)


def model_defaults(backbone: str, num_classes: int) -> ml_collections.ConfigDict:
  """`backbone`: a name in the models/backbones registry. The text encoder is a CLIP
  arch: the backbone's own for CLIP backbones, ViT-B/16's for ImageNet ones
  (docs/RECIPES.md)."""
  text_encoder = backbones.get(backbone).default_text_encoder
  return ml_collections.ConfigDict(
      dict(
          backbone=backbone,
          text_encoder=text_encoder,
          # CLIP ResNets' BatchNorm in training: "bn" = batch statistics (synchronised
          # over the data axis) with running statistics updated, as the released code
          # trains; "frozen_bn" = the checkpoint's running statistics.
          backbone_norm="bn",
          # ViT adapters (fpn1..fpn4): "group" = the released code's GroupNorm(1, C)
          # at the start of each; "none" = without it.
          adapter_norm="group",
          num_classes=num_classes,
          num_queries=100,
          hidden_dim=256,
          mask_dim=256,
          enc_layers=6,
          enc_ffn_dim=1024,
          enc_heads=8,
          enc_points=4,
          num_feature_levels=3,
          dec_layers=9,
          dec_ffn_dim=2048,
          dec_heads=8,
          text_queries=True,
          # The similarity loss's heads (the text_only variant, trained without that
          # loss, leaves them out; config.loss.similarity needs them).
          similarity_heads=True,
          joint_self_attn=True,
          num_contexts=3,
          context_length=8,
          class_length=5,
          gamma_init=1e-4,
          # Prompt contexts: "trunc_normal" (std 1, cut at +-2: the released code's
          # PyTorch trunc_normal_ defaults) or "normal" (std 0.02, as CoOp).
          context_init="trunc_normal",
          deform_attn_impl="auto",
          attention_impl="xla",  # decoder attention: "xla" | "cudnn" (GPU, bf16; models/decoder.py)
          dtype="float32",
      )
  )


def loss_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          class_weight=2.0,
          mask_weight=5.0,
          dice_weight=5.0,
          sim_weight=1.0,
          no_object_weight=0.1,
          num_points=12544,
          oversample_ratio=3.0,
          importance_sample_ratio=0.75,
          target_chunk=0,  # slots per point-loss chunk (0 = auto; objective/point_loss.py)
          matcher="host",  # "host" (scipy, callback) | "device" (XLA): objective/matching/
          similarity=True,
          neg="mix",
          tau=1.0,
      )
  )


def optim_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          lr=1e-4,
          weight_decay=0.02,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          warmup_steps=1500,
          warmup_start_factor=0.1,  # released config; DenseCLIP's is 1e-6
          poly_power=0.9,
          min_lr=0.0,
          clip_norm=0.01,
          # The poly schedule's end; -1: config.train.steps (validate_config fills it in).
          total_steps=-1,
          lr_mult_rules=[list(r) for r in LR_MULT_RULES],
          no_decay_rules=list(NO_DECAY_RULES),
      )
  )


def paper_config(dataset: str, backbone: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper recipe (docs/RECIPES.md) for `dataset` and `backbone`, with `arg` variants."""
  if dataset not in RECIPES:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(RECIPES)}")
  r = RECIPES[dataset]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_defaults(backbone, r["num_classes"])
  c.loss = loss_defaults()
  c.optim = optim_defaults()
  root = "data/" + ("ADEChallengeData2016" if dataset == "ade20k" else "cityscapes")
  c.data = data_config(dataset, root, max_segments=r["max_segments"], num_workers=4)
  # The text of the extra "none" class: "none", as the released code names it.
  c.data.none_class_name = "none"
  c.data.generate = ml_collections.ConfigDict(
      dict(enabled=False, train=0, val=0, size=(0, 0), seed=0)
  )
  c.eval = ml_collections.ConfigDict(
      dict(
          # The released config's test: sliding windows, also inside each multi-scale
          # pass (ms_flip with ms_mode="slide").
          mode="slide",
          ms_mode="slide",
          crop_size=r["crop"],
          stride=r["slide_stride"],
          scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
          flip=True,
          test_scale=r["test_scale"],
          split="val",
          every_steps=16_000,
          max_images=0,
          step=-1,
          head="class",
          at_end=True,
      )
  )
  c.train = ml_collections.ConfigDict(
      dict(
          steps=r["steps"],
          log_every=50,
          checkpoint_every=4000,
          max_to_keep=3,
          on_nan="stop",
          micro_batches=1,  # gradient accumulation: micro-batches per step (train/accumulate.py)
          # Resume a checkpoint of an earlier multi-process version (per-process data
          # orders) with the global data order from its step (docs/SCALING.md).
          restart_data_order=False,
      )
  )
  c.mesh = ml_collections.ConfigDict(
      dict(
          data=-1,  # -1: all devices not used by the other axes
          model=1,
          fsdp=False,
          fsdp_min_size=2**18,
      )
  )
  # clip: a converted CLIP folder (image tower if it is the backbone, text tower if it
  # is the text encoder); backbone: a converted backbone folder (any registered
  # backbone, e.g. ViT-S/16 or MiT-B4 from `python -m convert_weights`). Training
  # refuses to start without the weights the model needs unless allow_random=True
  # (config/validate.py, check_pretrained).
  c.init = ml_collections.ConfigDict(dict(clip="", backbone="", mask2former="", allow_random=False))
  variants.apply_variant(c, arg)
  return c
