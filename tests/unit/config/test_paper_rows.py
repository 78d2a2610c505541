"""Every paper row's config: each ablation variant differs from the full model in
exactly the keys of its table row (docs/REPRODUCE.md), the paper configs evaluate as
the released config does, and they refuse to train without pretrained weights."""

import jax
import jax.numpy as jnp
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import recipes
from mtaclip_jax.config import validate
from mtaclip_jax.config import variants
from mtaclip_jax.models import mtaclip
from mtaclip_jax.train import optim
from tests import train_fixtures


def flat(config) -> dict:
  out = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}.{k}" if prefix else k, v)
    else:
      out[prefix] = _hashable(value)

  walk("", config.to_dict())
  return out


def _hashable(value):
  return tuple(map(_hashable, value)) if isinstance(value, (list, tuple)) else value


def differences(config, reference) -> dict:
  """{key: value in config} for every key whose value differs from reference's."""
  a, b = flat(config), flat(reference)
  assert set(a) == set(b), set(a) ^ set(b)
  return {k: a[k] for k in a if a[k] != b[k]}


FULL = dict()  # Table 1 "Ours", Table 3 right last row, Table 4 (K=3, MixNeg, joint)
RELEASE_NO_DECAY = tuple(variants.RELEASE_NO_DECAY_RULES)
ROWS = [
    # Table 1 / 2 "Mask2Former (CLIP)", Table 3 right "Baseline"
    ("baseline", {"model.text_queries": False, "loss.similarity": False}),
    # Table 3 right "+ Text-Enhanced": before MTCL (no similarity loss) and before
    # MTPL (one prompt)
    (
        "text_only",
        {"loss.similarity": False, "model.similarity_heads": False, "model.num_contexts": 1},
    ),
    # Table 3 right "+ Text-Enhanced + MTCL"; Table 4 right, one prompt
    ("sim,K=1", {"model.num_contexts": 1}),
    # Table 3 right "+ MTPL" = the full model
    ("", FULL),
    # Table 4 left: separate self-attention
    ("joint=0", {"model.joint_self_attn": False}),
    # Table 4 right: K = 1..5 x MixNeg / SeparateNeg
    *[(f"K={k},neg=mix", {"model.num_contexts": k} if k != 3 else {}) for k in range(1, 6)],
    *[
        (
            f"K={k},neg=separate",
            {"loss.neg": "separate", **({"model.num_contexts": k} if k != 3 else {})},
        )
        for k in range(1, 6)
    ],
    # Where the sources differ (docs/REPRODUCE.md)
    ("paper_lr", {"optim.lr": 2e-4}),
    ("release_no_decay", {"optim.no_decay_rules": RELEASE_NO_DECAY}),
    ("bf16", {"model.dtype": "bfloat16"}),
    ("tau=0.07", {"loss.tau": 0.07}),
    ("text_only,K=3", {"loss.similarity": False, "model.similarity_heads": False}),
]


@pytest.mark.parametrize("arg,expect", ROWS, ids=[r[0] or "full" for r in ROWS])
def test_each_variant_changes_exactly_its_row(arg, expect):
  full = recipes.paper_config("ade20k", "RN50")
  got = differences(recipes.paper_config("ade20k", "RN50", arg), full)
  print(f"{arg or '(full model)'}: {got}")  # the table, for the reader (pytest -s)
  assert got == expect


@pytest.mark.parametrize(
    "name,expect",
    [
        # Table 1: the other CLIP backbones
        ("ade20k_r101", {"model.backbone": "RN101", "model.text_encoder": "RN101"}),
        ("ade20k_vitb16", {"model.backbone": "ViT-B/16", "model.text_encoder": "ViT-B/16"}),
        # Table 3 left: ImageNet backbones with CLIP ViT-B/16's text tower
        ("ade20k_vits16", {"model.backbone": "ViT-S/16", "model.text_encoder": "ViT-B/16"}),
        ("ade20k_mitb4", {"model.backbone": "MiT-B4", "model.text_encoder": "ViT-B/16"}),
    ],
)
def test_other_backbones_change_only_the_towers(name, expect):
  full = recipes.paper_config("ade20k", "RN50")
  assert differences(train_fixtures.load_config(name), full) == expect
  baseline = differences(
      train_fixtures.load_config(name, "baseline"), recipes.paper_config("ade20k", "RN50")
  )
  assert baseline == {**expect, "model.text_queries": False, "loss.similarity": False}


def test_cityscapes_changes_only_the_dataset_recipe():
  got = differences(
      train_fixtures.load_config("cityscapes_r50"), train_fixtures.load_config("ade20k_r50")
  )
  assert {k.split(".")[0] for k in got} <= {"data", "eval", "train", "optim", "model"}
  # optim.total_steps follows train.steps
  assert {k for k in got if k.startswith(("model.", "optim."))} - {"optim.total_steps"} == {
      "model.num_classes"
  }


@pytest.mark.parametrize("dataset,window", [("ade20k", (512, 341)), ("cityscapes", (1024, 683))])
def test_paper_configs_evaluate_with_the_released_protocol(dataset, window):
  """Single scale: sliding windows; multi-scale + flip: sliding windows in each pass."""
  c = recipes.paper_config(dataset, "RN50")
  assert c.eval.mode == "slide" and c.eval.ms_mode == "slide"
  assert tuple(c.eval.crop_size) == (window[0],) * 2 and tuple(c.eval.stride) == (window[1],) * 2
  assert tuple(c.eval.scales) == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and c.eval.flip


def test_released_defaults():
  c = recipes.paper_config("ade20k", "RN50")
  assert c.optim.lr == 1e-4 and c.optim.warmup_start_factor == 0.1
  assert c.model.context_init == "trunc_normal"
  assert not c.init.allow_random
  # CLIP ResNets' BatchNorm normalises with batch statistics in training; the ViTs'
  # adapters start with GroupNorm(1, C).
  assert c.model.backbone_norm == "bn" and c.model.adapter_norm == "group"
  # The "none" class's text is the release's.
  assert c.data.none_class_name == "none"
  # The demo keeps the running statistics and the "none" text it was tuned with.
  demo = train_fixtures.load_config("demo")
  assert demo.model.backbone_norm == "frozen_bn" and demo.data.none_class_name == "background"


# The decoder's heads of the similarity loss.
SIMILARITY_HEADS = ("mask_clip_proj", "text_clip_proj", "text_clip_norm", "gamma")


def _decoder_modules(arg):
  """Top-level names under decoder/ of configs/ade20k_r50.py:arg's parameter tree
  (jax.eval_shape: nothing is compiled or allocated)."""
  c = recipes.paper_config("ade20k", "RN50", arg)
  model = mtaclip.build_model(c.model)
  tokens = jnp.zeros((c.model.num_classes + 1, c.model.class_length), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), tokens)
  return {p.split("/")[1] for p in optim.flatten(shapes["params"]) if p.startswith("decoder/")}


@pytest.mark.parametrize(
    "arg,has_heads",
    [("", True), ("text_only", False), ("text_only,sim=1", True), ("sim,K=1", True)],
)
def test_similarity_heads_exist_only_where_the_loss_uses_them(arg, has_heads):
  """Table 3's "+ Text-Enhanced" (text_only) trains without the similarity loss, so
  its decoder has none of that loss's heads; the text queries' own parts stay."""
  names = _decoder_modules(arg)
  assert {"text_proj", "text_norm", "text_pos_embed"} <= names
  assert set(SIMILARITY_HEADS) & names == (set(SIMILARITY_HEADS) if has_heads else set())


@pytest.mark.parametrize(
    "name,arg,flags",
    [
        ("ade20k_r50", None, ["--config.init.clip", "RN50 image and text towers", "RN50.pt"]),
        ("ade20k_r50", "baseline", ["--config.init.clip", "RN50 image tower"]),
        ("cityscapes_r101", None, ["--config.init.clip", "RN101.pt"]),
        ("ade20k_vitb16", None, ["--config.init.clip", "ViT-B-16.pt"]),
        (
            "ade20k_vits16",
            None,
            ["--config.init.backbone", "--arch ViT-S/16", "--config.init.clip", "ViT-B-16.pt"],
        ),
        ("ade20k_mitb4", "baseline", ["--config.init.backbone", "--arch MiT-B4"]),
    ],
)
def test_paper_configs_refuse_random_initialisation(name, arg, flags):
  c = train_fixtures.load_config(name, arg)
  with pytest.raises(errors.ConfigError) as e:
    validate.check_pretrained(c)
  message = str(e.value)
  for flag in flags + ["python -m convert_weights", "--config.init.allow_random=True"]:
    assert flag in message, (flag, message)
  if arg == "baseline":
    assert "text tower" not in message  # the baseline has no text queries


@pytest.mark.parametrize(
    "name,init",
    [
        ("ade20k_r50", dict(clip="clip_rn50")),
        ("ade20k_r50:baseline", dict(backbone="rn50")),  # the image tower alone
        ("ade20k_vits16", dict(clip="clip_vitb16", backbone="vits16")),
        ("ade20k_mitb4:baseline", dict(backbone="mitb4")),
        ("ade20k_r101", dict(allow_random=True)),
        ("demo", {}),  # demo and test configs train from random initialisation
    ],
)
def test_weights_given_or_random_on_purpose_pass(name, init):
  name, _, arg = name.partition(":")
  c = train_fixtures.load_config(name, arg or None)
  c.init.update(init)
  validate.check_pretrained(c)


def test_text_tower_still_needed_with_a_backbone_folder():
  c = train_fixtures.load_config("ade20k_vits16")
  c.init.backbone = "vits16"
  with pytest.raises(errors.ConfigError, match="CLIP ViT-B/16 text tower") as e:
    validate.check_pretrained(c)
  assert "image tower" not in str(e.value)
