"""Every config builds, and its recipe equals docs/RECIPES.md."""

import glob
import importlib.util
import os

import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import recipes
from mtaclip_jax.config import validate
from tests import train_fixtures

ROOT = train_fixtures.ROOT
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_there_are_configs_for_every_paper_row():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert {
      "ade20k_r50",
      "ade20k_r101",
      "ade20k_vitb16",
      "cityscapes_r50",
      "cityscapes_r101",
      "demo",
      "ade20k_vits16",
      "ade20k_mitb4",
  } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_builds(path):
  c = load(path)
  assert c.model.num_classes == c.data.num_classes
  assert c.optim.total_steps == -1  # follows train.steps (test_validate.py)


@pytest.mark.parametrize(
    "name,dataset,backbone",
    [
        ("ade20k_r50", "ade20k", "RN50"),
        ("ade20k_r101", "ade20k", "RN101"),
        ("ade20k_vitb16", "ade20k", "ViT-B/16"),
        ("cityscapes_r50", "cityscapes", "RN50"),
        ("cityscapes_r101", "cityscapes", "RN101"),
        ("ade20k_vits16", "ade20k", "ViT-S/16"),
        ("ade20k_mitb4", "ade20k", "MiT-B4"),
    ],
)
def test_paper_recipe(name, dataset, backbone):
  c = load(os.path.join(ROOT, "configs", name + ".py"))
  assert c.model.backbone == backbone and c.data.name == dataset
  # ImageNet backbones pair with CLIP ViT-B/16's text tower (docs/RECIPES.md).
  imagenet = backbone in ("ViT-S/16", "MiT-B4")
  assert c.model.text_encoder == ("ViT-B/16" if imagenet else backbone)
  assert c.init.clip == "" and c.init.backbone == ""
  if dataset == "ade20k":
    assert tuple(c.data.crop_size) == (512, 512) and c.data.batch_size == 16
    assert c.train.steps == 160_000 and c.model.num_classes == 150
    assert tuple(c.eval.stride) == (341, 341)
  else:
    assert tuple(c.data.crop_size) == (1024, 1024) and c.data.batch_size == 8
    assert c.train.steps == 90_000 and c.model.num_classes == 19
    assert tuple(c.eval.stride) == (683, 683)
  o = c.optim
  assert (o.lr, o.weight_decay, o.b1, o.b2, o.eps) == (1e-4, 0.02, 0.9, 0.999, 1e-8)
  assert (o.warmup_steps, o.poly_power, o.min_lr, o.clip_norm) == (1500, 0.9, 0.0, 0.01)
  mults = {pattern: m for pattern, m in o.lr_mult_rules}
  assert mults["^backbone/"] == 0.1 and mults["^text_encoder/"] == 0.0
  assert mults["^contexts$"] == 1.0
  m = c.model
  assert (m.num_queries, m.hidden_dim, m.dec_layers, m.enc_layers) == (100, 256, 9, 6)
  assert (m.num_contexts, m.context_length, m.class_length) == (3, 8, 5)
  assert m.text_queries and m.joint_self_attn and m.gamma_init == 1e-4
  l = c.loss
  assert (l.class_weight, l.mask_weight, l.dice_weight, l.sim_weight) == (2, 5, 5, 1)
  assert (l.no_object_weight, l.num_points) == (0.1, 12544)
  assert (l.oversample_ratio, l.importance_sample_ratio) == (3.0, 0.75)
  assert l.similarity and l.neg == "mix" and l.tau == 1.0


@pytest.mark.parametrize(
    "arg,expect",
    [
        ("baseline", dict(text_queries=False, similarity=False)),
        ("text_only", dict(text_queries=True, similarity=False)),
        ("sim,K=1", dict(text_queries=True, similarity=True, K=1)),
        ("K=4,neg=separate", dict(K=4, neg="separate")),
        ("K=5,neg=mix", dict(K=5, neg="mix")),
        ("joint=0", dict(joint=False)),
        ("bf16", dict(dtype="bfloat16")),
    ],
)
def test_ablation_variants(arg, expect):
  c = recipes.paper_config("ade20k", "RN50", arg)
  got = dict(
      text_queries=c.model.text_queries,
      similarity=c.loss.similarity,
      K=c.model.num_contexts,
      neg=c.loss.neg,
      joint=c.model.joint_self_attn,
      dtype=c.model.dtype,
  )
  for k, v in expect.items():
    assert got[k] == v, (arg, k)


def test_bad_variants_are_named():
  with pytest.raises(ValueError, match="unknown config variant 'K3'"):
    recipes.paper_config("ade20k", "RN50", "K3")


@pytest.mark.parametrize(
    "arg,match",
    [
        ("neg=both", "config.loss.neg='both'"),
        ("baseline,sim=1", "config.loss.similarity=True needs config.model.text_queries=True"),
        ("K=0", "config.model.num_contexts=0"),
    ],
)
def test_bad_variant_values_are_named_by_validation(arg, match):
  with pytest.raises(errors.ConfigError, match=match):
    validate.validate_config(recipes.paper_config("ade20k", "RN50", arg))


@pytest.mark.parametrize("name", ["ade20k_vits16", "ade20k_mitb4"])
def test_imagenet_backbone_baseline(name):
  c = load(os.path.join(ROOT, "configs", name + ".py"), "baseline")
  assert not c.model.text_queries and not c.loss.similarity
  assert c.model.text_encoder == "ViT-B/16"


def test_unknown_backbone_is_named():
  with pytest.raises(ValueError, match="unknown backbone 'ViT-L/14'.*MiT-B4"):
    recipes.paper_config("ade20k", "ViT-L/14")
