"""CLIP tower behaviour on small shapes: output strides/channels, norms, dtypes, and the
resized positional embeddings (ViT and attention pool) against PyTorch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert_weights import convert_clip
from convert_weights import merge_into
from mtaclip_jax.models import clip
from mtaclip_jax.models.clip import resnet
from mtaclip_jax.models.clip.transformer import Transformer
from mtaclip_jax.models.clip.transformer import causal_mask
from mtaclip_jax.models.clip.vit import Fpn1
from mtaclip_jax.models.clip.vit import Fpn2
from mtaclip_jax.models.clip.vit import Fpn3
from mtaclip_jax.models.clip.vit import Fpn4
from tests.clip_reference import reference_clip
from tests.clip_reference import rel_err

# A 12-block ViT small enough for CPU tests (the dense taps need blocks 3/5/7/11).
SMALL_VIT = clip.CLIPArch(
    "small-vit",
    embed_dim=32,
    image_resolution=64,
    vision_layers=12,
    vision_width=64,
    vision_patch_size=16,
    transformer_width=64,
    transformer_heads=4,
    transformer_layers=2,
)


def test_arch_registry():
  assert set(clip.ARCHS) == {"RN50", "RN101", "ViT-B/16", "tiny"}
  assert clip.ARCHS["RN50"].feature_channels == {
      "res2": 256,
      "res3": 512,
      "res4": 1024,
      "res5": 2048,
  }
  assert clip.ARCHS["ViT-B/16"].feature_channels == {f"res{i}": 768 for i in range(2, 6)}
  assert clip.ARCHS["tiny"].feature_channels == {"res2": 64, "res3": 128, "res4": 256, "res5": 512}
  assert (
      clip.ARCHS["RN50"].embed_dim,
      clip.ARCHS["RN101"].embed_dim,
      clip.ARCHS["ViT-B/16"].embed_dim,
  ) == (1024, 512, 512)
  assert clip.ARCHS["ViT-B/16"].text_width == 512 and clip.ARCHS["tiny"].text_width == 64
  with pytest.raises(ValueError, match="unknown CLIP arch 'RN5'"):
    clip.ImageEncoder("RN5")
  with pytest.raises(ValueError, match="norm must be one of"):
    clip.ImageEncoder("tiny", norm="group")


@pytest.fixture(scope="module")
def tiny_ref():
  """Random PyTorch reference and its converted towers (no flax init to compile)."""
  model = reference_clip("tiny", seed=2)
  return model, convert_clip(model.state_dict())


@pytest.fixture(scope="module")
def tiny_variables(tiny_ref):
  return tiny_ref[1]["image"]


def _check_dense(out, arch, batch, h, w):
  for i, stride in zip(range(2, 6), (4, 8, 16, 32)):
    assert out[f"res{i}"].shape == (
        batch,
        h // stride,
        w // stride,
        arch.feature_channels[f"res{i}"],
    )
  assert out["embedding"].shape == (batch, arch.embed_dim)
  assert all(bool(jnp.isfinite(v).all()) for v in out.values())


def test_dense_outputs_any_size(tiny_variables):
  images = jnp.ones((2, 96, 128, 3))
  out = jax.jit(clip.ImageEncoder("tiny").apply)(tiny_variables, images)
  _check_dense(out, clip.ARCHS["tiny"], 2, 96, 128)


def _apply_fn(norm):
  enc = clip.ImageEncoder("tiny", norm=norm)

  @jax.jit
  def fn(variables, images):
    evaluation = enc.apply(variables, images, train=False)
    training, upd = enc.apply(variables, images, train=True, mutable=["batch_stats"])
    return evaluation, training, upd["batch_stats"]

  return fn


@pytest.mark.slow
def test_frozen_bn_ignores_train_and_bn_uses_batch_stats(tiny_variables):
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = tiny_variables
  a, b, stats = _apply_fn("frozen_bn")(variables, images)
  np.testing.assert_array_equal(a["res5"], b["res5"])
  jax.tree.map(np.testing.assert_array_equal, stats, variables["batch_stats"])
  a2, c, stats = _apply_fn("bn")(variables, images)
  np.testing.assert_array_equal(a2["res5"], a["res5"])
  assert not np.allclose(c["res5"], a["res5"])
  assert not np.allclose(stats["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


class _ConvBN(nn.Module):
  fold: bool
  kernel: int
  stride: int

  @nn.compact
  def __call__(self, x):
    if self.fold:
      return resnet.conv_bn(
          x, 8, self.kernel, jnp.float64, "conv", "bn", running=True, stride=self.stride
      )
    y = resnet._conv(8, self.kernel, jnp.float64, "conv", stride=self.stride)(x)
    return resnet._bn(jnp.float64, "bn")(y, use_running_average=True)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (3, 1), (1, 1)])
def test_frozen_bn_folded_into_the_convolution(kernel, stride):
  """conv_bn with running statistics = nn.Conv then nn.BatchNorm: same variables (tree,
  initial values) and, in float64, the same output and gradients to rounding (1x1
  stride 1 goes through `pointwise_conv`, a matmul with its own weight gradient)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 5), jnp.float64)
    plain, folded = _ConvBN(False, kernel, stride), _ConvBN(True, kernel, stride)
    v = plain.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, folded.init(jax.random.key(0), x), v)
    rng = np.random.default_rng(0)
    v = {
        "params": {
            "conv": {"kernel": v["params"]["conv"]["kernel"].astype(jnp.float64)},
            "bn": {"scale": rng.uniform(0.5, 1.5, 8), "bias": rng.normal(size=8)},
        },
        "batch_stats": {"bn": {"mean": rng.normal(size=8), "var": rng.uniform(0.5, 2.0, 8)}},
    }

    def loss(module, params, images):
      out = module.apply({**v, "params": params}, images)
      return jnp.sum(jnp.sin(out)), out

    grad = lambda m: jax.value_and_grad(functools.partial(loss, m), (0, 1), has_aux=True)
    (_, a), ga = grad(plain)(v["params"], x)
    (_, b), gb = grad(folded)(v["params"], x)
    assert a.shape == (2, 9 // stride + (stride > 1), 9 // stride + (stride > 1), 8)
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(q, p, rtol=1e-11, atol=1e-11), ga, gb)


@pytest.mark.slow
@pytest.mark.parity
def test_bn_train_mode_matches_torch(tiny_ref):
  """norm="bn", train=True normalises with batch statistics like torch train mode."""
  model, towers = tiny_ref
  images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
  feats = {}
  model.visual.train()
  hook = model.visual.layer4.register_forward_hook(lambda m, i, o: feats.update(o=o))
  with torch.no_grad():
    try:
      model.visual(torch.from_numpy(images))
    except RuntimeError:  # attention pool needs 224 inputs; layer4 ran already
      pass
  hook.remove()
  model.visual.eval()
  _, out, _ = _apply_fn("bn")(towers["image"], jnp.asarray(images.transpose(0, 2, 3, 1)))
  err = rel_err(out["res5"], feats["o"].permute(0, 2, 3, 1).numpy())
  print(f"\ntiny norm=bn train res5 vs torch train mode: {err:.2e}")
  assert err <= 1e-4


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32(tiny_ref, tiny_variables):
  images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  variables = tiny_variables
  f32 = jax.jit(clip.ImageEncoder("tiny").apply)(variables, images)
  bf16 = jax.jit(clip.ImageEncoder("tiny", dtype=jnp.bfloat16).apply)(variables, images)
  assert bf16["res5"].dtype == jnp.bfloat16
  assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
  assert rel_err(bf16["res5"].astype(jnp.float32), f32["res5"]) < 5e-2
  text = clip.TextEncoder("tiny", dtype=jnp.bfloat16)
  tv = tiny_ref[1]["text"]
  out = jax.jit(functools.partial(text.apply, method="encode_prompts"))(
      tv, jnp.array([[49406, 320, 49407, 0, 0]]), jnp.zeros((3, 8, 64))
  )
  assert out.shape == (3, 1, 64) and out.dtype == jnp.bfloat16


def test_encode_prompts_shapes_and_context_sensitivity(tiny_ref):
  text = clip.TextEncoder("tiny")
  tv = tiny_ref[1]["text"]
  tokens = jnp.array([[49406, 320, 49407, 0, 0], [49406, 320, 321, 322, 49407]])
  ctx = jax.random.normal(jax.random.key(2), (3, 8, 64)) * 0.02
  prompts = lambda c: text.apply(tv, tokens, c, method="encode_prompts")
  out, vjp = jax.vjp(jax.jit(prompts), ctx)
  assert out.shape == (3, 2, 64)
  assert not np.allclose(out[0], out[1])  # different contexts, different prompts
  (grad,) = vjp(jnp.ones_like(out))
  assert float(jnp.abs(grad).sum()) > 0


def _whole_prompts(module, class_tokens, contexts):
  """The prompts encoded as whole sequences [SOT] + contexts + names (no shared part)."""
  k, ctx_len, width = contexts.shape
  c, n = class_tokens.shape
  emb = module.token_embedding(class_tokens)
  x = jnp.concatenate(
      [
          jnp.broadcast_to(emb[None, :, :1], (k, c, 1, width)),
          jnp.broadcast_to(contexts[:, None], (k, c, ctx_len, width)),
          jnp.broadcast_to(emb[None, :, 1:], (k, c, n - 1, width)),
      ],
      axis=2,
  )
  eot = jnp.tile(jnp.argmax(class_tokens, axis=-1) + ctx_len, k)
  return module._encode(x.reshape(k * c, ctx_len + n, width), eot).reshape(k, c, -1)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_encode_prompts_shares_the_context_tokens_exactly(tiny_ref, dtype):
  """encode_prompts computes [SOT] + contexts once per context: outputs and the
  contexts' gradient equal encoding every whole sequence (float64: 1e-12 relative;
  float32: 1e-5), for names of every length (the [EOT] at each position)."""
  with jax.enable_x64(dtype == jnp.float64):
    text = clip.TextEncoder("tiny", dtype=dtype)
    tv = jax.tree.map(lambda a: jnp.asarray(a, dtype), tiny_ref[1]["text"])
    tokens = jnp.array(
        [
            [49406, 320, 49407, 0, 0],
            [49406, 320, 321, 322, 49407],
            [49406, 49407, 0, 0, 0],
            [49406, 323, 324, 49407, 0],
        ]
    )
    ctx = jax.random.normal(jax.random.key(2), (3, 8, 64), dtype) * 0.5
    cot = jax.random.normal(jax.random.key(3), (3, 4, 64), dtype)
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    outs = []
    for fn in ("encode_prompts", _whole_prompts):
      f = jax.jit(lambda c: text.apply(tv, tokens, c, method=fn))
      out, vjp = jax.vjp(f, ctx)
      outs.append((out, vjp(cot)[0]))
    for got, want in zip(*outs):
      assert got.dtype == dtype
      assert rel_err(got, want) < tol


@pytest.mark.slow
@pytest.mark.parity
def test_vit_resized_positional_embedding_matches_torch():
  """At a non-native size the ViT equals PyTorch's VisionTransformer whose positional
  grid was resized with F.interpolate(bicubic, align_corners=False)."""
  model = reference_clip(SMALL_VIT, seed=3)
  towers = convert_clip(model.state_dict(), arch=SMALL_VIT)
  ref = model.visual
  images = np.random.default_rng(0).standard_normal((1, 3, 96, 128)).astype(np.float32)
  pos = ref.positional_embedding.data
  grid = (
      torch.nn.functional.interpolate(
          pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2),
          size=(6, 8),
          mode="bicubic",
          align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .reshape(48, -1)
  )
  ref.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], grid]))
  with torch.no_grad():
    want = ref(torch.from_numpy(images)).numpy()
  enc = clip.ImageEncoder(SMALL_VIT)
  x = jnp.asarray(images.transpose(0, 2, 3, 1))
  init = jax.jit(enc.init)(jax.random.key(0), x)
  got = jax.jit(enc.apply)(merge_into(init, towers["image"]), x)
  err = rel_err(got["embedding"], want)
  print(f"\nsmall ViT 96x128 (resized positional embedding) embedding: {err:.2e}")
  assert err <= 1e-4
  _check_dense(got, SMALL_VIT, 1, 96, 128)


@pytest.mark.parity
def test_fpn_adapters_match_torch():
  """With adapter_norm="none", fpn1/fpn2 equal PyTorch's Sequential(ConvTranspose2d,
  BatchNorm2d, GELU, ConvTranspose2d) / ConvTranspose2d with weights mapped like a conv
  (OIHW -> HWIO), in eval and train mode."""

  torch.manual_seed(0)
  w = 8
  fpn1 = torch.nn.Sequential(
      torch.nn.ConvTranspose2d(w, w, 2, 2),
      torch.nn.BatchNorm2d(w),
      torch.nn.GELU(),
      torch.nn.ConvTranspose2d(w, w, 2, 2),
  )
  fpn2 = torch.nn.ConvTranspose2d(w, w, 2, 2)
  with torch.no_grad():
    fpn1[1].weight.normal_(1, 0.2), fpn1[1].bias.normal_(0, 0.1)
    fpn1[1].running_mean.normal_(0, 0.1), fpn1[1].running_var.uniform_(0.5, 1.5)
  conv = lambda m: {
      "kernel": m.weight.detach().numpy().transpose(2, 3, 1, 0),
      "bias": m.bias.detach().numpy(),
  }
  bn = fpn1[1]
  v1 = {
      "params": {
          "0": conv(fpn1[0]),
          "3": conv(fpn1[3]),
          "1": {"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()},
      },
      "batch_stats": {"1": {"mean": bn.running_mean.numpy(), "var": bn.running_var.numpy()}},
  }
  x = np.random.default_rng(0).standard_normal((2, 3, 5, w)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  to_nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
  plain2 = Fpn2(w, norm="none")
  assert rel_err(plain2.apply({"params": {"0": conv(fpn2)}}, x), to_nhwc(fpn2(xt))) <= 1e-6
  plain1 = Fpn1(w, norm="none")
  fpn1.eval()
  assert rel_err(plain1.apply(v1, x), to_nhwc(fpn1(xt))) <= 1e-6
  fpn1.train()
  got, _ = plain1.apply(v1, x, train=True, mutable=["batch_stats"])
  assert rel_err(got, to_nhwc(fpn1(xt))) <= 1e-5
  assert Fpn3(norm="none").init(jax.random.key(0), x) == {}
  assert Fpn4(norm="none").init(jax.random.key(0), x) == {}


# float32, relative to the largest output (measured 2.7e-7 .. 8.2e-7 on CPU): both sum
# GroupNorm's statistics in float32 over H x W x C (here 120 values).
GROUP_NORM_TOL = 2e-6


@pytest.mark.parity
def test_group_norm_adapters_match_the_released_torch_adapters():
  """adapter_norm="group" (the default): fpn3 is torch's GroupNorm(1, C) on the NCHW
  tensor (random affine), and fpn1 / fpn2 / fpn4 equal the release's
  Sequential(GroupNorm, ConvTranspose2d, BatchNorm2d, GELU, ConvTranspose2d) /
  Sequential(GroupNorm, ConvTranspose2d) / Sequential(GroupNorm, MaxPool2d(2, 2)), with
  each GroupNorm at `fpnN/group_norm`; fpn1 in eval and train mode."""
  torch.manual_seed(0)
  w = 8
  gn = lambda: torch.nn.GroupNorm(1, w)  # eps 1e-5, as the release builds it
  fpn1 = torch.nn.Sequential(
      gn(),
      torch.nn.ConvTranspose2d(w, w, 2, 2),
      torch.nn.BatchNorm2d(w),
      torch.nn.GELU(),
      torch.nn.ConvTranspose2d(w, w, 2, 2),
  )
  fpn2 = torch.nn.Sequential(gn(), torch.nn.ConvTranspose2d(w, w, 2, 2))
  fpn3 = gn()
  fpn4 = torch.nn.Sequential(gn(), torch.nn.MaxPool2d(2, 2))
  norms = (fpn1[0], fpn2[0], fpn3, fpn4[0])
  with torch.no_grad():
    for norm in norms:
      norm.weight.normal_(1, 0.3), norm.bias.normal_(0, 0.3)
    fpn1[2].weight.normal_(1, 0.2), fpn1[2].bias.normal_(0, 0.1)
    fpn1[2].running_mean.normal_(0, 0.1), fpn1[2].running_var.uniform_(0.5, 1.5)
  np_ = lambda t: t.detach().numpy()
  group = lambda m: {"scale": np_(m.weight), "bias": np_(m.bias)}
  conv = lambda m: {"kernel": np_(m.weight).transpose(2, 3, 1, 0), "bias": np_(m.bias)}
  bn = fpn1[2]
  v1 = {
      "params": {
          "group_norm": group(fpn1[0]),
          "0": conv(fpn1[1]),
          "1": {"scale": np_(bn.weight), "bias": np_(bn.bias)},
          "3": conv(fpn1[4]),
      },
      "batch_stats": {"1": {"mean": bn.running_mean.numpy(), "var": bn.running_var.numpy()}},
  }
  v2 = {"params": {"group_norm": group(fpn2[0]), "0": conv(fpn2[1])}}
  v3 = {"params": {"group_norm": group(fpn3)}}
  v4 = {"params": {"group_norm": group(fpn4[0])}}
  # Per-image offsets and scales, so that the per-image statistics matter.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 5, w)) * np.array([0.5, 3.0]).reshape(2, 1, 1, 1)
  x = (x + np.array([-2.0, 4.0]).reshape(2, 1, 1, 1)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # the same values, NCHW
  to_nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()

  # The shapes flax creates are the ones filled in above.
  init = lambda m, *a: jax.tree.map(np.shape, m.init(jax.random.key(0), x, *a))
  assert init(Fpn1(w), False) == jax.tree.map(np.shape, v1)
  for module, v in ((Fpn2(w), v2), (Fpn3(), v3), (Fpn4(), v4)):
    assert init(module) == jax.tree.map(np.shape, v)

  errs = {
      "fpn3 = GroupNorm(1, C)": rel_err(Fpn3().apply(v3, x), to_nhwc(fpn3(xt))),
      "fpn2": rel_err(Fpn2(w).apply(v2, x), to_nhwc(fpn2(xt))),
      "fpn4": rel_err(Fpn4().apply(v4, x), to_nhwc(fpn4(xt))),
  }
  fpn1.eval()
  errs["fpn1 eval"] = rel_err(Fpn1(w).apply(v1, x), to_nhwc(fpn1(xt)))
  print("\nGroupNorm adapters vs torch:", {k: f"{e:.1e}" for k, e in errs.items()})
  assert max(errs.values()) <= GROUP_NORM_TOL, errs
  fpn1.train()
  got, _ = Fpn1(w).apply(v1, x, train=True, mutable=["batch_stats"])
  assert rel_err(got, to_nhwc(fpn1(xt))) <= 1e-5  # as the train-mode BN above


def test_transformer_last_block_at_one_position_equals_the_whole():
  """`last_at`: the last block computes only the queried position (the text tower's
  EOT token); output and input gradient equal the whole transformer's there
  (float64, causal mask)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(3), (4, 7, 16), jnp.float64)
    at = jnp.asarray([6, 0, 3, 5])
    tower = Transformer(16, 3, 2, jnp.float64)
    v = jax.tree.map(
        lambda a: a.astype(jnp.float64) + 0.01, tower.init(jax.random.key(0), x, causal_mask(7))
    )

    def whole(xs):
      out, _ = tower.apply(v, xs, causal_mask(7))
      return out[jnp.arange(4), at]

    def only_at(xs):
      out, _ = tower.apply(v, xs, causal_mask(7), last_at=at)
      assert out.shape == (4, 1, 16)
      return out[:, 0]

    np.testing.assert_allclose(only_at(x), whole(x), rtol=1e-12, atol=1e-12)
    grad = lambda f: jax.grad(lambda xs: jnp.sum(jnp.sin(f(xs))))(x)
    np.testing.assert_allclose(grad(only_at), grad(whole), rtol=1e-11, atol=1e-11)
