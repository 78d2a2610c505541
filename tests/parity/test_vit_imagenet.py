"""ImageNet ViT-S/16 backbone vs a random-init transformers ViTModel (every block, the
final norm, res2..res5 through the registry against the released code's torch
adapters), the timm-style key mapping against a pure-torch transcription of timm's
VisionTransformer, and the conversion errors a user can cause."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
import transformers

from convert_weights import CheckpointError
from convert_weights import convert_any
from convert_weights import convert_vit
from mtaclip_jax.models import backbones
from mtaclip_jax.models.backbones import vit_imagenet
from tests import clip_reference
from tests.clip_reference import reference_clip
from tests.clip_reference import rel_err
from tests.clip_reference import state_dict_numpy

ARCH = vit_imagenet.ARCHS["ViT-S/16"]
TOL = 1e-5


@pytest.fixture(scope="module")
def hf():
  return clip_reference.reference_vit_s16()


@pytest.fixture(scope="module")
def backbone():
  """The registry's ViT-S/16 with jitted init and apply (block outputs captured)."""
  module = backbones.get("ViT-S/16").build(dtype=jnp.float32, norm="frozen_bn", name=None)
  init = jax.jit(module.init)
  apply = jax.jit(
      lambda v, x: module.apply(
          v, x, capture_intermediates=lambda m, _: isinstance(m, vit_imagenet.Layer)
      )
  )
  return module, init, apply


def _variables(init, params, shape, seed=2):
  """Init variables with `params` overlaid; the new adapters' BN stats and GroupNorm
  affines randomised."""
  v = jax.tree.map(np.asarray, init(jax.random.key(seed), jnp.zeros(shape)))
  rng = np.random.default_rng(seed)
  bn = v["batch_stats"]["fpn1"]["1"]
  bn["mean"] = rng.standard_normal(bn["mean"].shape).astype(np.float32) * 0.1
  bn["var"] = rng.uniform(0.5, 2.0, bn["var"].shape).astype(np.float32)
  for adapter in ("fpn1", "fpn2", "fpn3", "fpn4"):
    gn = v["params"][adapter]["group_norm"]
    gn["scale"] = (1 + 0.3 * rng.standard_normal(gn["scale"].shape)).astype(np.float32)
    gn["bias"] = (0.3 * rng.standard_normal(gn["bias"].shape)).astype(np.float32)
  return {**v, "params": {**v["params"], **params}}


def _blocks(inter):
  layers = inter["intermediates"]["layers"]
  return [np.asarray(layers[str(i)]["__call__"][0]) for i in range(ARCH.num_layers)]


def _torch_adapters(params, stats):
  """The adapters as the released code builds them in PyTorch (GroupNorm(1, C) first in
  each), with our weights."""
  w = ARCH.hidden_size

  def gn(p):
    m = nn.GroupNorm(1, w)
    m.weight.data = torch.from_numpy(np.array(p["group_norm"]["scale"]))
    m.bias.data = torch.from_numpy(np.array(p["group_norm"]["bias"]))
    return m

  def up(p):
    m = nn.ConvTranspose2d(w, w, 2, 2)
    m.weight.data = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
    m.bias.data = torch.from_numpy(np.array(p["bias"]))
    return m

  bn = nn.BatchNorm2d(w)
  bn.weight.data = torch.from_numpy(np.array(params["fpn1"]["1"]["scale"]))
  bn.bias.data = torch.from_numpy(np.array(params["fpn1"]["1"]["bias"]))
  bn.running_mean.data = torch.from_numpy(np.array(stats["fpn1"]["1"]["mean"]))
  bn.running_var.data = torch.from_numpy(np.array(stats["fpn1"]["1"]["var"]))
  fpn1 = nn.Sequential(
      gn(params["fpn1"]), up(params["fpn1"]["0"]), bn, nn.GELU(), up(params["fpn1"]["3"])
  )
  fpn2 = nn.Sequential(gn(params["fpn2"]), up(params["fpn2"]["0"]))
  fpn4 = nn.Sequential(gn(params["fpn4"]), nn.MaxPool2d(2, 2))
  return [m.eval() for m in (fpn1, fpn2, gn(params["fpn3"]), fpn4)]


@pytest.mark.parity
@pytest.mark.slow
def test_every_block_and_tap_match_transformers(hf, backbone):
  """Non-square input off the 14x14 pretraining grid: position embeddings are resized
  as ViTModel(interpolate_pos_encoding=True) does."""
  _, init, apply = backbone
  h, w = 96, 128
  images = np.random.default_rng(0).standard_normal((2, h, w, 3)).astype(np.float32)
  variables = _variables(init, convert_vit(hf.state_dict()), (1, h, w, 3))
  out, inter = apply(variables, jnp.asarray(images))
  with torch.no_grad():
    ref = hf(
        torch.from_numpy(images.transpose(0, 3, 1, 2)),
        output_hidden_states=True,
        interpolate_pos_encoding=True,
    )
  errs = [
      rel_err(ours, theirs.numpy()) for ours, theirs in zip(_blocks(inter), ref.hidden_states[1:])
  ]
  print("per-block relative error:", ", ".join(f"{e:.1e}" for e in errs))
  assert max(errs) <= TOL
  assert rel_err(out["embedding"], ref.last_hidden_state[:, 0].numpy()) <= TOL

  gh, gw = h // 16, w // 16
  grid = lambda t: ref.hidden_states[t + 1][:, 1:].reshape(2, gh, gw, -1).permute(0, 3, 1, 2)
  fpn1, fpn2, fpn3, fpn4 = _torch_adapters(variables["params"], variables["batch_stats"])
  with torch.no_grad():
    want = {
        "res2": fpn1(grid(3)),
        "res3": fpn2(grid(5)),
        "res4": fpn3(grid(7)),
        "res5": fpn4(grid(11)),
    }
  errs = {}
  for k, v in want.items():
    v = v.numpy().transpose(0, 2, 3, 1)
    assert out[k].shape == v.shape, k
    errs[k] = rel_err(out[k], v)
  print("res2..res5 relative error:", {k: f"{e:.1e}" for k, e in errs.items()})
  assert max(errs.values()) <= TOL


class _TimmAttention(nn.Module):
  """timm.models.vision_transformer.Attention (qkv_bias=True, unfused path)."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.scale = self.head_dim**-0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _TimmMlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class _TimmBlock(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = _TimmAttention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = _TimmMlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _TimmPatchEmbed(nn.Module):

  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class _TimmViT(nn.Module):
  """timm VisionTransformer (class token, no pos-embed resampling, head) — a
  transcription of timm's published vision_transformer.py, used only at its native
  size."""

  def __init__(self, img=224, patch=16, dim=384, depth=12, heads=6):
    super().__init__()
    self.patch_embed = _TimmPatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
    self.blocks = nn.Sequential(*[_TimmBlock(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, 1000)

  def forward(self, x):
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    outs = []
    for blk in self.blocks:
      x = blk(x)
      outs.append(x)
    return outs, self.norm(x)


@pytest.mark.parity
@pytest.mark.slow
def test_timm_state_dict_converts(backbone):
  """timm names (packed qkv split in thirds) give the same blocks as timm's code."""
  _, init, apply = backbone
  torch.manual_seed(3)
  timm = clip_reference.randomise(_TimmViT().eval(), 4)
  state = timm.state_dict()
  assert {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "head.weight"} <= set(state)
  images = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
  variables = _variables(init, convert_vit(state), images.shape)
  out, inter = apply(variables, jnp.asarray(images))
  with torch.no_grad():
    outs, final = timm(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  errs = [rel_err(a, b.numpy()) for a, b in zip(_blocks(inter), outs)]
  print("timm per-block relative error:", ", ".join(f"{e:.1e}" for e in errs))
  assert max(errs) <= TOL
  assert rel_err(out["embedding"], final[:, 0].numpy()) <= TOL


def _hf_state(layers=12, hidden=384, **kw):
  cfg = transformers.ViTConfig(
      hidden_size=hidden,
      num_hidden_layers=layers,
      num_attention_heads=6,
      intermediate_size=4 * hidden,
      **kw,
  )
  return {k: v.numpy() for k, v in transformers.ViTModel(cfg).state_dict().items()}


@pytest.fixture(scope="module")
def hf_state():
  torch.manual_seed(0)
  return _hf_state()


def test_hub_names_and_heads(hf_state):
  """The model hub's older key names and a ViTForImageClassification wrapper convert to
  the same params; heads and the pooler are ignored."""
  hub = {}
  for k, v in hf_state.items():
    k = k.replace("layers.", "encoder.layer.").replace(
        "attention.q_proj", "attention.attention.query"
    )
    k = k.replace("attention.k_proj", "attention.attention.key").replace(
        "attention.v_proj", "attention.attention.value"
    )
    k = (
        k.replace("attention.o_proj", "attention.output.dense")
        .replace("mlp.fc1", "intermediate.dense")
        .replace("mlp.fc2", "output.dense")
    )
    hub["vit." + k] = v
  hub["classifier.weight"] = np.zeros((10, 384), np.float32)
  assert "vit.encoder.layer.3.attention.attention.query.weight" in hub
  a, b = convert_vit(hf_state), convert_vit(hub)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  q = a["layers"]["3"]["attention"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(q, hf_state["layers.3.attention.q_proj.weight"].T)


def test_wrong_architecture_is_named(hf_state):
  clip_state = state_dict_numpy(reference_clip("tiny", seed=0))
  with pytest.raises(
      CheckpointError, match="needs ImageNet ViT weights, but the " "keys are CLIP names"
  ):
    convert_any(clip_state, "ViT-S/16")
  with pytest.raises(CheckpointError, match="(?s)ViT arch 'ViT-S/16'.*unknown keys"):
    convert_vit(clip_state, "ViT-S/16")
  with pytest.raises(CheckpointError, match="needs CLIP weights.*ImageNet ViT names"):
    convert_any(hf_state, "RN50")
  # A ViT of other widths: no registered arch; forced, every mis-shaped key is listed.
  torch.manual_seed(0)
  tiny = _hf_state(layers=12, hidden=192)
  with pytest.raises(CheckpointError, match=r"weights of no known arch.*\['ViT-S/16'\]"):
    convert_any(tiny)
  misshaped = r"mis-shaped keys.*layers\.0\.attention\.q_proj\.weight: \(192, 192\)"
  with pytest.raises(CheckpointError, match=misshaped):
    convert_vit(tiny, "ViT-S/16")


def test_unknown_and_missing_keys_listed(hf_state):
  state = dict(hf_state)
  del state["layers.4.mlp.fc1.bias"]
  state["layers.0.attention.gate.weight"] = np.zeros((384,), np.float32)
  with pytest.raises(CheckpointError) as e:
    convert_vit(state)
  msg = str(e.value)
  assert "1 unknown keys: ['layers.0.attention.gate.weight']" in msg
  assert "1 missing parameters: ['layers/4/mlp/fc1/bias']" in msg
  # The final layernorm only feeds the unused embedding: it may be absent (timm fc_norm).
  state = {k: v for k, v in hf_state.items() if not k.startswith("layernorm.")}
  assert "layernorm" not in convert_vit(state)


@pytest.mark.slow
def test_bfloat16_compute_float32_params(backbone):
  """bf16 compute: float32 parameters, bf16 features within bf16 rounding of fp32
  (the fp32 side reuses the parity test's compiled functions)."""
  _, init, apply = backbone
  x = jax.random.normal(jax.random.key(0), (2, 96, 128, 3))
  variables = _variables(init, {}, (1, 96, 128, 3))
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(variables))
  ref, _ = apply(variables, x)
  bf16 = backbones.get("ViT-S/16").build(dtype=jnp.bfloat16)
  for k, v in jax.jit(bf16.apply)(variables, x).items():
    assert v.dtype == jnp.bfloat16, k
    assert rel_err(np.asarray(v, np.float32), ref[k]) <= 0.03, k
