"""The backbone registry and its wiring: every registered backbone builds the full model,
the configs' optimizer rules cover the new parameter trees, the convert_weights CLI writes
ViT-S/16 and MiT-B4 folders that config.init.backbone loads next to a CLIP text tower
(config.init.clip), and the errors a user can cause name what was wrong."""

import json
import re

import flax
import jax
from jax.extend.core import Literal
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.torch import save_file
import torch
import transformers

import convert_weights
from convert_weights import backbone_convert
from convert_weights.__main__ import main as cli_main
from mtaclip_jax import errors
from mtaclip_jax.config import recipes
from mtaclip_jax.config import validate
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.models import backbones
from mtaclip_jax.models import clip
from mtaclip_jax.models import mtaclip
from mtaclip_jax.train import optim
from mtaclip_jax.train import pretrained
from tests import clip_reference
from tests import train_fixtures


def test_registry():
  assert set(backbones.REGISTRY) == {"RN50", "RN101", "ViT-B/16", "tiny", "ViT-S/16", "MiT-B4"}
  vits, mitb4 = backbones.get("ViT-S/16"), backbones.get("MiT-B4")
  assert (vits.family, vits.channels, vits.default_text_encoder) == (
      "imagenet",
      (384,) * 4,
      "ViT-B/16",
  )
  assert (mitb4.family, mitb4.channels) == ("imagenet", (64, 128, 320, 512))
  assert backbones.get("RN50").default_text_encoder == "RN50"
  assert all(b.strides == (4, 8, 16, 32) for b in backbones.REGISTRY.values())
  with pytest.raises(ValueError, match=r"unknown backbone 'MiT-B9'; known: \['MiT-B4'"):
    backbones.get("MiT-B9")
  with pytest.raises(ValueError, match="already registered"):
    backbones.register(vits)
  with pytest.raises(ValueError, match="family must be one of"):
    backbones.register(
        backbones.Backbone("x", "imagenet21k", (1,) * 4, backbones.STRIDES, vits.build)
    )


@pytest.mark.parametrize(
    "keys,kind",
    [
        (["embeddings.patch_embeddings.projection.weight", "layers.0.mlp.fc1.weight"], "vit"),
        (["vit.embeddings.patch_embeddings.projection.weight", "classifier.weight"], "vit"),
        (["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"], "vit"),
        (["stages.0.patch_embeddings.proj.weight"], "mit"),
        (
            ["segformer.encoder.patch_embeddings.0.proj.weight", "decode_head.classifier.weight"],
            "mit",
        ),
        (["patch_embed1.proj.weight", "block1.0.attn.kv.weight", "norm4.weight"], "mit"),
        (["visual.conv1.weight", "text_projection"], "clip"),
        (["conv1.weight", "fc.weight"], None),
    ],
)
def test_source_kind_from_key_names(keys, kind):
  assert backbone_convert.source_kind({k: np.zeros((2, 2)) for k in keys}) == kind


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(backbones.REGISTRY))
def test_declared_channels_and_strides(name):
  b = backbones.get(name)
  module = b.build(dtype=jnp.float32, norm="frozen_bn", name="backbone")
  images = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), images)
  out = jax.eval_shape(module.apply, variables, images)
  for i, (c, s) in enumerate(zip(b.channels, b.strides)):
    assert out[f"res{i + 2}"].shape == (1, 64 // s, 96 // s, c), (name, i)
  # ViT-S/16: transformers ViTModel without pooler (21,665,664) + FPN adapters, their
  # four GroupNorms (4 x 2 x 384) included.
  counts = {"ViT-S/16": 23_440_128, "MiT-B4": 60_842_688}
  if name in counts:
    assert sum(v.size for v in jax.tree.leaves(variables["params"])) == counts[name]


def _unreached(fn, params) -> set[str]:
  """Paths of the parameters whose gradient of `fn` is a symbolic zero (no path from
  them to the output), read from the jaxpr of the gradient, not from numbers."""
  jaxpr = jax.make_jaxpr(jax.grad(fn))(params).jaxpr
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}

  def zero(v):
    if isinstance(v, Literal):
      return np.all(np.asarray(v.val) == 0)
    e = producer.get(v)
    return (
        e is not None
        and e.primitive.name in ("broadcast_in_dim", "convert_element_type", "reshape")
        and zero(e.invars[0])
    )

  paths = [
      "/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  return {p for p, v in zip(paths, jaxpr.outvars, strict=True) if zero(v)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(backbones.REGISTRY))
def test_exactly_the_unreached_parameters_are_frozen(name):
  """The default rules freeze a backbone parameter iff no gradient of res2..res5
  reaches it (CLIP's attention pool / ln_post / proj, the ImageNet ViT's final norm):
  such a parameter would otherwise carry AdamW state and weight decay for nothing,
  and XLA spends seconds constant-folding its zero gradient's norm."""
  module = backbones.get(name).build(name="backbone")
  images = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(module.init, jax.random.key(0), images)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def features(params):
    out = module.apply({**variables, "params": params}, images)
    return sum(jnp.sum(out[f"res{i}"]) for i in range(2, 6))

  unreached = _unreached(features, variables["params"])
  if name != "MiT-B4":
    assert unreached, "the check must see the image-level head"
  rules = recipes.optim_defaults().lr_mult_rules
  frozen = {
      p
      for p in optim.flatten(variables["params"])
      if optim.lr_multiplier("backbone/" + p, rules) == 0.0
  }
  assert frozen == unreached


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["ViT-S/16", "MiT-B4"])
def test_full_model_and_baseline_build(backbone, tmp_path):
  config = train_fixtures.tiny_config(tmp_path)
  config.model.update(backbone=backbone, text_encoder="ViT-B/16")
  model = mtaclip.build_model(config.model)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((5, 5), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  out = jax.eval_shape(model.apply, variables, images, tokens)
  assert out["masks"].shape == (3, 2, 8, 16, 16)
  assert out["t_proj"].shape[-1] == 512  # ViT-B/16's CLIP embedding
  config.model.text_queries = False
  base = mtaclip.build_model(config.model)
  shapes = jax.eval_shape(base.init, jax.random.key(0), images)
  assert set(shapes["params"]) == {"backbone", "pixel_decoder", "decoder"}


def test_text_encoder_must_be_clip(tmp_path):
  config = train_fixtures.tiny_config(tmp_path)
  config.model.update(backbone="ViT-S/16", text_encoder="ViT-S/16")
  with pytest.raises(errors.ConfigError, match="config.model.text_encoder"):
    validate.validate_config(config)
  config.model.text_encoder = ""  # empty: the registry's default
  assert mtaclip.build_model(config.model).text_encoder == "ViT-B/16"


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["ViT-S/16", "MiT-B4"])
def test_optimizer_rules_cover_the_new_trees(backbone):
  """No decay for norms, the class token and position embeddings; convolutions (the
  patch embedding included, as detectron2 does) and dense layers decay; the backbone
  trains at lr x0.1 but for ViT-S/16's unread final norm, and the text tower is
  frozen."""
  c = recipes.paper_config("ade20k", backbone)
  model = mtaclip.build_model(c.model)
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((151, 5), jnp.int32)
      )
  )
  groups = optim.describe_rules(shapes["params"], c.optim)
  mine = lambda g: {p for p in groups[g] if p.startswith("backbone/")}
  for p in mine("decay"):
    assert p.endswith(("kernel", "bias")) and "norm" not in p, p
  for p in mine("no decay"):
    assert re.search(r"(norm[^/]*|fpn1/1)/(scale|bias)$|/(cls_token|position_embeddings)$", p), p
  if backbone == "ViT-S/16":
    assert {
        "backbone/embeddings/cls_token",
        "backbone/embeddings/position_embeddings",
        "backbone/layers/11/layernorm_after/scale",
    } <= mine("no decay")
  heads = (
      {"backbone/layernorm/scale", "backbone/layernorm/bias"} if backbone == "ViT-S/16" else set()
  )  # the final norm feeds no res2..res5
  assert (
      mine("lr x0.1")
      == {p for p in optim.flatten(shapes["params"]) if p.startswith("backbone/")} - heads
  )
  assert {p for p in groups["lr x0"] if not p.startswith("text_encoder/")} == heads


@flax.struct.dataclass
class _State:
  params: dict
  batch_stats: dict


def _zero_state(config):
  model = mtaclip.build_model(config.model)
  shapes = jax.eval_shape(
      model.init,
      jax.random.key(0),
      jnp.zeros((1, 64, 64, 3)),
      data_classes.class_tokens(config.data, config.model.class_length),
  )
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return _State(zeros["params"], zeros.get("batch_stats", {}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Checkpoint files of random-init ViT-S/16, MiT-B4, MiT-B0 and tiny CLIP, and the
  ViT-S/16, MiT-B4 and CLIP folders the CLI writes from them."""
  d = tmp_path_factory.mktemp("backbones")
  torch.manual_seed(0)
  vit = transformers.ViTModel(
      transformers.ViTConfig(
          hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536
      ),
      add_pooling_layer=False,
  )
  save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, d / "vit.safetensors")
  for name, depths, widths in (
      ("b4", [3, 8, 27, 3], [64, 128, 320, 512]),
      ("b0", [2, 2, 2, 2], [32, 64, 160, 256]),
  ):
    mit = transformers.SegformerModel(
        transformers.SegformerConfig(depths=depths, hidden_sizes=widths, decoder_hidden_size=256)
    )
    torch.save(mit.state_dict(), d / f"mit_{name}.bin")
  torch.save(clip_reference.reference_clip("tiny").state_dict(), d / "clip.pt")
  out = {k: d / f"out_{k}" for k in ("vit", "mit", "clip")}
  for k, src in (("vit", "vit.safetensors"), ("mit", "mit_b4.bin"), ("clip", "clip.pt")):
    assert cli_main(["--src", str(d / src), "--out", str(out[k])]) == 0
  return d, out


@pytest.mark.slow
def test_cli_folders(folders, capsys):
  d, out = folders
  metas = {k: json.loads((v / "meta.json").read_text()) for k, v in out.items()}
  assert {k: m["arch"] for k, m in metas.items()} == {
      "vit": "ViT-S/16",
      "mit": "MiT-B4",
      "clip": "tiny",
  }
  assert "text" not in metas["vit"]["params"] and "text" in metas["clip"]["params"]
  assert metas["mit"]["params"]["image"] == 60_842_688
  # Another architecture for --arch, a registered-kind checkpoint of an unregistered
  # size, and an existing folder: exit 1 with one line naming the problem.
  capsys.readouterr()
  cases = [
      (
          ["--src", str(d / "vit.safetensors"), "--arch", "MiT-B4"],
          "needs SegFormer MiT weights, but the keys are ImageNet ViT names",
      ),
      (
          ["--src", str(d / "mit_b0.bin")],
          "holds MiT-B0 weights; registered SegFormer" " MiT backbones: ['MiT-B4']",
      ),
      (["--src", str(d / "mit_b0.bin"), "--arch", "MiT-B4"], "'MiT-B0'"),
      (["--src", str(d / "clip.pt"), "--arch", "ViT-S/16"], "keys are CLIP names"),
      (["--src", str(d / "vit.safetensors")], "already exists"),
  ]
  for args, message in cases:
    dest = out["vit"] if message == "already exists" else d / "never"
    assert cli_main(args + ["--out", str(dest)]) == 1, args
    assert message in capsys.readouterr().err, (args, message)
  assert not (d / "never" / "variables").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["ViT-S/16", "MiT-B4"])
def test_init_backbone_and_clip_text_tower(folders, backbone, tmp_path):
  _, out = folders
  config = train_fixtures.tiny_config(tmp_path)
  config.model.update(backbone=backbone, text_encoder="tiny")
  config.init.backbone = str(out["vit" if backbone == "ViT-S/16" else "mit"])
  config.init.clip = str(out["clip"])
  state = _zero_state(config)
  loaded = optim.flatten(jax.device_get(pretrained.load_pretrained(state, config).params))
  _, image = convert_weights.load_converted(config.init.backbone)
  _, clip_towers = convert_weights.load_converted(config.init.clip)
  expect = {f"backbone/{k}": v for k, v in optim.flatten(image["image"]["params"]).items()}
  expect.update(
      {f"text_encoder/{k}": v for k, v in optim.flatten(clip_towers["text"]["params"]).items()}
  )
  for k, v in expect.items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  kept = {k for k in loaded if k.startswith("backbone/") and k not in expect}
  adapters = tuple(f"backbone/{a}/" for a in clip.vit.ADAPTERS)
  assert kept == (
      {k for k in loaded if k.startswith(adapters)} if backbone == "ViT-S/16" else set()
  )


@pytest.mark.slow
def test_init_errors_are_named(folders, tmp_path):
  _, out = folders
  config = train_fixtures.tiny_config(tmp_path)
  config.model.update(backbone="MiT-B4", text_encoder="tiny")
  state = _zero_state(config)
  config.init.backbone = str(out["vit"])
  with pytest.raises(
      errors.ConfigError, match="holds ViT-S/16 weights but " "config.model.backbone='MiT-B4'"
  ):
    pretrained.load_pretrained(state, config)
  config.init.backbone, config.init.clip = "", str(out["mit"])
  with pytest.raises(
      errors.ConfigError, match="without a CLIP text tower; pass it as " "config.init.backbone"
  ):
    pretrained.load_pretrained(state, config)
  tiny = train_fixtures.tiny_config(tmp_path)  # CLIP "tiny" backbone and text tower
  tiny.init.update(clip=str(out["clip"]), backbone=str(out["clip"]))
  with pytest.raises(errors.ConfigError, match="hold weights for backbone/; set only one"):
    pretrained.load_pretrained(_zero_state(tiny), tiny)
