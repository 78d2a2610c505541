"""Any image size segments to a label of that size: tiny and extreme aspect ratios,
and large images whose labels are computed a tile of rows at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtaclip_jax.evaluation import inference

NUM_CLASSES = 5
_W = np.random.RandomState(0).randn(3, NUM_CLASSES).astype(np.float32)


def pixel_fn(x):
  return jnp.tanh(jnp.asarray(x) @ _W)


def _image(h, w, seed=1):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _settings(mode, **kw):
  return inference.Settings(
      mode=mode,
      test_scale=(160, 128),
      crop_size=(64, 64),
      stride=(48, 48),
      scales=(0.5, 1.0),
      flip=True,
      ms_mode="slide",
      **kw,
  )


def test_a_side_that_would_round_to_zero_keeps_one_pixel():
  assert inference.rescale_size(1, 600, (160, 128)) == (1, 160)  # mmcv: (0, 160)
  assert inference.rescale_size(600, 1, (160, 128)) == (160, 1)
  assert inference.rescale_size(1, 1, (160, 128)) == (128, 128)
  assert inference.rescale_size(1000, 800, (160, 128)) == (160, 128)  # unchanged


@pytest.mark.parametrize("mode", ["whole", "slide", "ms_flip"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 600), (600, 1), (2, 9000), (7, 3)])
def test_any_size_gives_a_label_of_its_size(mode, hw):
  label = inference.segment(pixel_fn, _image(*hw), _settings(mode))
  assert label.shape == hw and label.dtype == np.int32
  assert 0 <= label.min() and label.max() < NUM_CLASSES


@pytest.mark.parametrize("mode", ["whole", "ms_flip"])
def test_tiled_labels_equal_the_argmax_of_the_full_scores(mode, monkeypatch):
  image = _image(300, 200)
  settings = _settings(mode)
  want = np.asarray(jnp.argmax(inference.predict_scores(pixel_fn, image, settings), -1))[:300, :200]
  np.testing.assert_array_equal(inference.segment(pixel_fn, image, settings), want)
  # Tiles of 8 rows (the smallest): 38 tiles, the same labels.
  monkeypatch.setattr(inference, "LABEL_TILE_BYTES", 1)
  assert inference.tile_rows(300, 200, NUM_CLASSES, settings) == 8
  np.testing.assert_array_equal(inference.segment(pixel_fn, image, settings), want)


def test_tile_rows_bound_the_scores_held():
  s = inference.Settings()
  assert inference.tile_rows(100, 100, 150, s) == 128  # small: the whole image
  rows = inference.tile_rows(6000, 8000, 150, s)
  assert rows % 8 == 0 and rows * 8064 * 150 * 4 <= inference.LABEL_TILE_BYTES


def test_resize_region_rows_from_row0():
  buf = jax.random.normal(jax.random.key(0), (20, 30, 4))
  args = (np.array((17, 25)), np.array((90, 70)))
  full = np.asarray(inference.resize_region(buf, *args, (96, 70)))
  part = inference.resize_region(buf, *args, (16, 70), row0=np.int32(40))
  np.testing.assert_array_equal(np.asarray(part), full[40:56])
