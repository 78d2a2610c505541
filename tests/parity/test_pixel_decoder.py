"""Pixel decoder pieces vs their PyTorch references (fp32, tolerances per test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: E402  (a test dependency: never skipped)
from transformers.models.mask2former import modeling_mask2former as m2f  # noqa: E402

from mtaclip_jax.models import pixel_decoder as pd


@pytest.mark.parity
@pytest.mark.parametrize("h,w", [(2, 3), (16, 16), (13, 7)])
def test_sine_position_embedding(h, w):
  ref = m2f.Mask2FormerSinePositionEmbedding(num_position_features=64, normalize=True)(
      torch.Size([1, 128, h, w]), "cpu", torch.float32
  )
  ref = ref[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(pd.sine_position_embedding(h, w, 64), ref, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize(
    "src,dst",
    [
        ((16, 24), (2, 3)),
        ((125, 93), (16, 12)),
        ((7, 5), (14, 10)),
        ((31, 17), (63, 40)),
        ((10, 10), (10, 10)),
    ],
)
def test_resize_bilinear_matches_torch(src, dst):
  x = np.random.default_rng(0).standard_normal((2, 3) + src).astype(np.float32)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False
  ).numpy()
  got = pd.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), dst)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-5)


@pytest.mark.parity
def test_reference_points():
  shapes = [(2, 3), (4, 6), (8, 12)]
  ref = m2f.Mask2FormerPixelDecoderEncoderOnly.get_reference_points(
      shapes, torch.ones(1, 3, 2), "cpu"
  )[0].numpy()
  np.testing.assert_allclose(pd.reference_points(shapes), ref, atol=1e-6)


def test_output_shapes_and_missing_feature():
  feats = {f"res{i + 2}": jnp.zeros((1, 32 // 2**i, 48 // 2**i, 16 * 2**i)) for i in range(4)}
  mod = pd.PixelDecoder(
      conv_dim=32, mask_dim=48, enc_layers=1, enc_ffn_dim=64, enc_heads=4, enc_points=2
  )
  out, _ = jax.eval_shape(mod.init_with_output, jax.random.PRNGKey(0), feats)
  assert out["mask_features"].shape == (1, 32, 48, 48)
  assert [f.shape for f in out["multi_scale_features"]] == [
      (1, 4, 6, 32),
      (1, 8, 12, 32),
      (1, 16, 24, 32),
  ]
  with pytest.raises(ValueError, match="res2"):
    mod.init(jax.random.PRNGKey(0), {k: v for k, v in feats.items() if k != "res2"})
