"""Pixel decoder + decoder (text_queries=False) vs transformers' Mask2Former.

A random-init, shrunk `Mask2FormerForUniversalSegmentation` (small ResNet, 2
encoder layers, 3 decoder layers so the level cycling 32/16/8 is exercised) is
converted with `convert_mask2former_hf`; both sides get the same backbone
feature maps. Every size differs from transformers' defaults (width 64, mask features
48, 4 heads, FFNs 96 / 160, 12 queries, 7 classes), and every compared tensor is
random: transformers initialises the biases, the norms and the deformable attention's
sampling offsets and attention weights to constants (zeros or ones), where a
conversion error would not show, so those are redrawn (and a test checks that no
converted tensor is constant). Tolerance: fp32, 1e-4 relative to each output's max
magnitude.
"""

import os

import jax
import numpy as np
import pytest

from convert_weights.mask2former_hf import check_params
from convert_weights.mask2former_hf import convert_mask2former_hf
from mtaclip_jax.models.decoder import MaskTextDecoder
from mtaclip_jax.models.pixel_decoder import PixelDecoder
from mtaclip_jax.train import optim

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402  (a test dependency: never skipped)
import transformers  # noqa: E402

NUM_LABELS = 7
NUM_QUERIES = 12
SIZES = dict(  # transformers' defaults: 256, 256, 256, 8, 1024, 2048, 100
    feature_size=64,
    hidden_dim=64,
    mask_feature_size=48,
    num_attention_heads=4,
    encoder_feedforward_dim=96,
    dim_feedforward=160,
    num_queries=NUM_QUERIES,
)
TOL = 1e-4


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def _randomise(modules, seed):
  """Norm scales ~1 +- 0.2, every bias (`in_proj_bias` included) and the deformable attention's sampling offsets
  and attention weights (zeros at init) small and random."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in modules:
      for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        norm = isinstance(_owner(module, name), (torch.nn.LayerNorm, torch.nn.GroupNorm))
        if norm and leaf == "weight":
          p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif leaf.endswith("bias") or "sampling_offsets" in name or "attention_weights" in name:
          p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _owner(module, name):
  for part in name.split(".")[:-1]:
    module = getattr(module, part)
  return module


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  backbone = transformers.ResNetConfig(
      out_features=["stage1", "stage2", "stage3", "stage4"],
      depths=[1, 1, 1, 1],
      hidden_sizes=[64, 128, 256, 512],
      embedding_size=32,
  )
  cfg = transformers.Mask2FormerConfig(
      backbone_config=backbone,
      num_labels=NUM_LABELS,
      encoder_layers=2,
      decoder_layers=4,
      **SIZES,
  )
  model = transformers.Mask2FormerForUniversalSegmentation(cfg).eval()
  _randomise(
      [
          model.model.pixel_level_module.decoder,
          model.model.transformer_module,
          model.class_predictor,
      ],
      seed=1,
  )
  pixels = torch.randn(2, 3, 64, 96)
  with torch.no_grad():
    feats = model.model.pixel_level_module.encoder(pixels).feature_maps
    pix = model.model.pixel_level_module.decoder(feats)
    dec = model.model.transformer_module(pix.multi_scale_features, pix.mask_features)
    logits = [model.class_predictor(h.transpose(0, 1)) for h in dec.intermediate_hidden_states]
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return {
      "state_dict": model.state_dict(),
      "features": {f"res{i + 2}": nhwc(f) for i, f in enumerate(feats)},
      "mask_features": nhwc(pix.mask_features),
      "multi_scale": [nhwc(f) for f in pix.multi_scale_features],
      "logits": np.stack([l.numpy() for l in logits]),
      "masks": np.stack([m.numpy() for m in dec.masks_queries_logits]),
  }


@pytest.fixture(scope="module")
def converted(reference):
  return convert_mask2former_hf(reference["state_dict"])


@pytest.fixture(scope="module")
def ours(reference, converted):
  params = converted
  pixel = PixelDecoder(
      conv_dim=SIZES["feature_size"],
      mask_dim=SIZES["mask_feature_size"],
      enc_layers=2,
      enc_ffn_dim=SIZES["encoder_feedforward_dim"],
      enc_heads=SIZES["num_attention_heads"],
  )
  decoder = MaskTextDecoder(
      num_classes=NUM_LABELS,
      num_queries=NUM_QUERIES,
      hidden_dim=SIZES["hidden_dim"],
      mask_dim=SIZES["mask_feature_size"],
      num_heads=SIZES["num_attention_heads"],
      ffn_dim=SIZES["dim_feedforward"],
      num_layers=3,
      text_queries=False,
  )
  feats = reference["features"]
  # The converted trees must have exactly the init's structure and shapes.
  shapes = jax.eval_shape(pixel.init, jax.random.PRNGKey(0), feats)["params"]
  check_params(params["pixel_decoder"], shapes, "pixel_decoder")
  pix = jax.jit(lambda p, f: pixel.apply({"params": p}, f))(params["pixel_decoder"], feats)
  dec_shapes = jax.eval_shape(
      decoder.init, jax.random.PRNGKey(0), pix["multi_scale_features"], pix["mask_features"]
  )["params"]
  check_params(params["decoder"], dec_shapes, "decoder")
  dec = jax.jit(lambda p, ms, mf: decoder.apply({"params": p}, ms, mf))(
      params["decoder"], pix["multi_scale_features"], pix["mask_features"]
  )
  return pix, dec


@pytest.mark.parity
def test_every_compared_tensor_is_random(converted):
  """No converted tensor is constant (all zeros, all ones, ...), so each one that is
  swapped, transposed or dropped changes the outputs compared below."""
  flat = {}
  for root, tree in converted.items():
    flat.update({f"{root}/{k}": v for k, v in optim.flatten(tree).items()})
  constant = sorted(k for k, v in flat.items() if np.ptp(np.asarray(v)) == 0)
  assert not constant, constant
  assert len(flat) > 100, len(flat)


@pytest.mark.parity
@pytest.mark.slow
def test_pixel_decoder_matches(reference, ours):
  pix, _ = ours
  print("mask_features", _rel_err(pix["mask_features"], reference["mask_features"]))
  assert _rel_err(pix["mask_features"], reference["mask_features"]) <= TOL
  assert len(pix["multi_scale_features"]) == 3
  for got, want in zip(pix["multi_scale_features"], reference["multi_scale"]):
    assert got.shape == want.shape
    print("memory", got.shape, _rel_err(got, want))
    assert _rel_err(got, want) <= TOL


@pytest.mark.parity
@pytest.mark.slow
def test_decoder_layers_match(reference, ours):
  _, dec = ours
  # 3 layers + the prediction before the first layer.
  assert dec["logits"].shape == (4, 2, NUM_QUERIES, NUM_LABELS + 1)
  assert dec["masks"].shape == (4, 2, NUM_QUERIES, 16, 24)
  assert set(dec) == {"logits", "masks", "mask_embed", "mask_features"}
  for layer in range(4):
    print(
        "layer",
        layer,
        "logits",
        _rel_err(dec["logits"][layer], reference["logits"][layer]),
        "masks",
        _rel_err(dec["masks"][layer], reference["masks"][layer]),
    )
    assert _rel_err(dec["logits"][layer], reference["logits"][layer]) <= TOL, layer
    assert _rel_err(dec["masks"][layer], reference["masks"][layer]) <= TOL, layer


def test_converter_rejects_foreign_state_dict():
  with pytest.raises(ValueError, match="no Mask2Former"):
    convert_mask2former_hf({"backbone.conv.weight": np.zeros((1,))})
  with pytest.raises(ValueError, match="unexpected key"):
    convert_mask2former_hf(
        {
            "model.pixel_level_module.decoder.bogus.weight": np.zeros((1,)),
            "model.transformer_module.level_embed.weight": np.zeros((3, 4)),
        }
    )
