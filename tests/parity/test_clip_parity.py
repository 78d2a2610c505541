"""fp32 parity of the CLIP towers with OpenAI's `clip/model.py` (random init, every
parameter and BN statistic randomised) and transformers' CLIPModel, through the weight
conversion of each supported checkpoint format.

Tolerance (relative, max|ours - ref| / max|ref|): <= 1e-5 at every block output of the
chained forward (each Bottleneck / residual attention block) and <= 1e-4 for the tower
outputs (dense stages, embeddings, text features). Measured values: docs/PARITY.md.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert_weights import convert_clip
from convert_weights import merge_into
from mtaclip_jax.models import clip
from mtaclip_jax.models.clip import resize
from mtaclip_jax.models.clip import tokenizer
from mtaclip_jax.models.clip.resnet import Bottleneck
from mtaclip_jax.models.clip.transformer import ResidualAttentionBlock
from tests.clip_reference import reference_clip
from tests.clip_reference import rel_err

pytestmark = [pytest.mark.parity, pytest.mark.slow]

BLOCK_TOL = 1e-5
TOWER_TOL = 1e-4


@functools.lru_cache(maxsize=None)
# res4/res5 of a ViT are compared with the tapped tokens themselves: the adapters'
# GroupNorms (compared with torch's in test_clip_models.py) are left out here.
def _image_encoder(arch_name):
  return clip.ImageEncoder(arch_name, adapter_norm="none")


def _image_apply(arch_name):
  enc = _image_encoder(arch_name)

  def fn(variables, images):
    out, inter = enc.apply(
        variables,
        images,
        capture_intermediates=lambda m, _: isinstance(m, (Bottleneck, ResidualAttentionBlock)),
        mutable=["intermediates"],
    )
    return out, inter["intermediates"]

  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _text_apply(arch_name, method):
  return jax.jit(functools.partial(clip.TextEncoder(arch_name).apply, method=method))


def _blocks_jax(inter, vit):
  """Block outputs in forward order from captured intermediates."""
  out = []
  if vit:
    blocks = inter["transformer"]["resblocks"]
    return [blocks[str(i)]["__call__"][0] for i in range(len(blocks))]
  for layer in ("layer1", "layer2", "layer3", "layer4"):
    blocks = inter[layer]
    out += [blocks[str(i)]["__call__"][0] for i in range(len(blocks))]
  return out


def _run_reference(model, images_nchw):
  """(embedding, {res_i: NHWC}, [block outputs]) with forward hooks."""
  visual, blocks, stages = model.visual, [], {}
  hooks = []
  if hasattr(visual, "transformer"):
    for blk in visual.transformer.resblocks:  # LND -> NLD
      hooks.append(
          blk.register_forward_hook(
              lambda m, i, o: blocks.append(o.detach().permute(1, 0, 2).numpy())
          )
      )
  else:
    for s in range(1, 5):
      layer = getattr(visual, f"layer{s}")
      hooks.append(
          layer.register_forward_hook(
              lambda m, i, o, s=s: stages.__setitem__(
                  f"res{s + 1}", o.detach().permute(0, 2, 3, 1).numpy()
              )
          )
      )
      for blk in layer:
        hooks.append(
            blk.register_forward_hook(
                lambda m, i, o: blocks.append(o.detach().permute(0, 2, 3, 1).numpy())
            )
        )
  with torch.no_grad():
    emb = model.encode_image(torch.from_numpy(images_nchw)).numpy()
  for h in hooks:
    h.remove()
  return emb, stages, blocks


def _image_variables(arch_name, converted, size):
  if not clip.ARCHS[arch_name].is_vit:
    return converted
  init = jax.jit(_image_encoder(arch_name).init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return merge_into(init, converted)  # FPN adapters stay random


def _save(model, fmt, tmp_path):
  """Write the reference state dict in one of the supported formats."""
  sd = model.state_dict()
  if fmt == "pt":
    path = tmp_path / "model.pt"
    torch.save(sd, path)
  elif fmt == "safetensors":
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  elif fmt == "open_clip":
    path = tmp_path / "open_clip.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
  return path


def _check_image(arch_name, fmt, size, batch, tmp_path_factory, record):
  model = reference_clip(arch_name, seed=1)
  path = _save(model, fmt, tmp_path_factory.mktemp(arch_name.replace("/", "")))
  towers = convert_clip(str(path))
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
  if size != clip.ARCHS[arch_name].image_resolution and not clip.ARCHS[arch_name].is_vit:
    # DenseCLIP-style reference for other sizes: bicubic-resized attention-pool grid.
    pos = model.visual.attnpool.positional_embedding.data
    n = round((pos.shape[0] - 1) ** 0.5)
    g = (
        torch.nn.functional.interpolate(
            pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2),
            size=(size // 32, size // 32),
            mode="bicubic",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .reshape(-1, pos.shape[1])
    )
    model.visual.attnpool.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], g]))
  emb_ref, stages_ref, blocks_ref = _run_reference(model, images)
  variables = _image_variables(arch_name, towers["image"], size)
  out, inter = _image_apply(arch_name)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
  blocks = _blocks_jax(inter, clip.ARCHS[arch_name].is_vit)
  assert len(blocks) == len(blocks_ref)
  block_errs = [rel_err(a, b) for a, b in zip(blocks, blocks_ref)]
  errs = {"embedding": rel_err(out["embedding"], emb_ref), "max block": max(block_errs)}
  for k, v in stages_ref.items():
    errs[k] = rel_err(out[k], v)
  if clip.ARCHS[arch_name].is_vit:
    # res4 = patch tokens after block 7; res5 = 2x2 max pool of those after block 11
    g = size // clip.ARCHS[arch_name].vision_patch_size
    tap = lambda i: blocks_ref[i][:, 1:].reshape(batch, g, g, -1)
    errs["res4"] = rel_err(out["res4"], tap(7))
    pooled = tap(11).reshape(batch, g // 2, 2, g // 2, 2, -1).max(axis=(2, 4))
    errs["res5"] = rel_err(out["res5"], pooled)
  record(f"{arch_name} image {size}x{size} b{batch} ({fmt})", errs)
  assert max(block_errs) <= BLOCK_TOL, block_errs
  for k, e in errs.items():
    assert e <= TOWER_TOL, (k, e)
  return model, towers


_RESULTS = {}


@pytest.fixture(scope="module")
def record():
  def _record(name, errs):
    _RESULTS[name] = errs
    print(f"\n{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))

  yield _record


@pytest.fixture(scope="module")
def rn50(tmp_path_factory, record):
  return _check_image("RN50", "pt", 224, 1, tmp_path_factory, record)


def test_rn50_image_224_plain_pt(rn50):
  model, towers = rn50
  assert set(towers["image"]) == {"params", "batch_stats"}


def test_rn101_dense_64_safetensors(tmp_path_factory, record):
  _check_image("RN101", "safetensors", 64, 2, tmp_path_factory, record)


def test_vit_b16_image_224_open_clip(tmp_path_factory, record):
  _check_image("ViT-B/16", "open_clip", 224, 1, tmp_path_factory, record)


SENTENCES = [
    "a photo of a cat.",
    "A diagram of the Mask2Former decoder, drawn by hand!",
    "an image",
    "traffic light at night, seen from 3 m away",
]


def test_rn50_encode_text(rn50, record):
  model, towers = rn50
  tokens = tokenizer.tokenize(SENTENCES)
  with torch.no_grad():
    ref = model.encode_text(torch.from_numpy(tokens).long()).numpy()
  ours = _text_apply("RN50", "encode_text")(towers["text"], jnp.asarray(tokens))
  err = rel_err(ours, ref)
  record("RN50 text encode_text (pt)", {"features": err})
  assert err <= TOWER_TOL


def test_rn50_encode_prompts_equals_encode_text_of_words(rn50, record):
  """K=1 contexts = token embeddings of 8 one-token words: each class's prompt feature
  equals encode_text("w1 .. w8 name") tokenized normally (77 tokens; causal attention
  makes the padding after position 13 irrelevant)."""
  model, towers = rn50
  words = "a bright photo of the one small big".split()
  ids = [tokenizer.encode(w) for w in words]
  assert all(len(i) == 1 for i in ids), ids
  emb = towers["text"]["params"]["token_embedding"]["embedding"]
  contexts = emb[np.array([i[0] for i in ids])][None]  # [1, 8, width]
  names = ["cat", "traffic light", "chest of drawers", "sky"]
  class_tokens = tokenizer.tokenize_class_names(names)
  ours = _text_apply("RN50", "encode_prompts")(
      towers["text"], jnp.asarray(class_tokens), jnp.asarray(contexts)
  )
  assert ours.shape == (1, len(names), clip.ARCHS["RN50"].embed_dim)
  full = tokenizer.tokenize([" ".join(words + [n]) for n in names])
  with torch.no_grad():
    ref = model.encode_text(torch.from_numpy(full).long()).numpy()
  err = rel_err(ours[0], ref)
  record("RN50 text encode_prompts K=1 (pt)", {"features": err})
  assert err <= TOWER_TOL


def _randomise_hf(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.02 * torch.randn(p.shape, generator=g))
      elif "norm" in name or "layrnorm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def test_hf_clip_vit_b16(tmp_path, record):
  from transformers import CLIPConfig
  from transformers import CLIPModel

  arch = clip.ARCHS["ViT-B/16"]
  torch.manual_seed(3)
  config = CLIPConfig(
      text_config=dict(
          hidden_size=512,
          intermediate_size=2048,
          num_attention_heads=8,
          num_hidden_layers=12,
          max_position_embeddings=77,
          vocab_size=49408,
          hidden_act="quick_gelu",
      ),
      vision_config=dict(
          hidden_size=768,
          intermediate_size=3072,
          num_attention_heads=12,
          num_hidden_layers=12,
          image_size=224,
          patch_size=16,
          hidden_act="quick_gelu",
      ),
      projection_dim=512,
  )
  model = CLIPModel(config).eval()
  _randomise_hf(model, 4)
  from safetensors.torch import save_file

  path = tmp_path / "hf_clip.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  towers = convert_clip(str(path))
  images = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
  tokens = tokenizer.tokenize(SENTENCES)
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(images))
    txt = model.get_text_features(input_ids=torch.from_numpy(tokens).long())
  img = getattr(img, "pooler_output", img).numpy()
  txt = getattr(txt, "pooler_output", txt).numpy()
  variables = _image_variables("ViT-B/16", towers["image"], 224)
  out, _ = _image_apply("ViT-B/16")(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
  ours_txt = _text_apply("ViT-B/16", "encode_text")(towers["text"], jnp.asarray(tokens))
  errs = {
      "image embedding": rel_err(out["embedding"], img),
      "text features": rel_err(ours_txt, txt),
  }
  record("ViT-B/16 HF CLIPModel (safetensors)", errs)
  assert arch.embed_dim == img.shape[-1]
  for k, e in errs.items():
    assert e <= TOWER_TOL, (k, e)


@pytest.mark.parametrize("in_size,out_size", [(7, 2), (7, 16), (14, 32), (14, 9)])
def test_bicubic_resize_matches_torch(in_size, out_size):
  grid = np.random.default_rng(in_size).standard_normal((in_size, in_size, 5)).astype(np.float32)
  ref = (
      torch.nn.functional.interpolate(
          torch.from_numpy(grid).permute(2, 0, 1)[None],
          size=(out_size, out_size + 1),
          mode="bicubic",
          align_corners=False,
      )[0]
      .permute(1, 2, 0)
      .numpy()
  )
  ours = resize.resize_grid(jnp.asarray(grid), (out_size, out_size + 1))
  err = rel_err(ours, ref)
  print(f"\nbicubic {in_size}->{out_size}x{out_size + 1}: {err:.2e}")
  assert err <= 1e-6
