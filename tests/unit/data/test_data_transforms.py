"""Transforms against reference computations (mmseg semantics)."""

import colorsys

import numpy as np
import pytest

from mtaclip_jax.data import transforms as T


def _example(h=40, w=60, seed=0, num_classes=5):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
  label[:3] = 255
  image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  return {"image": image, "label": label, "name": "x"}


def test_parse_formats_and_errors():
  ops = T.parse("random_flip(prob=0.25)|normalize|pad(size=(8, 8))")
  assert ops[0] == ("random_flip", {"prob": 0.25})
  assert ops[1] == ("normalize", {})
  assert ops[2] == ("pad", {"size": (8, 8)})
  with pytest.raises(ValueError, match="unknown transform 'flipp'"):
    T.parse(["flipp()"])
  with pytest.raises(ValueError, match="random_flip\\(p=1\\)"):
    T.parse(["random_flip(p=1)"])
  with pytest.raises(ValueError, match="expected name"):
    T.parse(["random_flip(prob=x + 1)"])


@pytest.mark.parametrize(
    "hw,scale",
    [
        ((512, 683), (2048, 512)),
        ((1024, 2048), (2048, 1024)),
        ((300, 4000), (2048, 512)),
        ((97, 33), (1000, 250)),
    ],
)
def test_rescale_size_matches_mmcv(hw, scale):
  h, w = hw
  # mmcv.rescale_size((w, h), scale) with return_scale
  f = min(max(scale) / max(h, w), min(scale) / min(h, w))
  assert T.rescale_size(h, w, scale) == (int(h * f + 0.5), int(w * f + 0.5))
  nh, nw = T.rescale_size(h, w, scale)
  assert max(nh, nw) <= max(scale) + 1 and min(nh, nw) <= min(scale) + 1


def test_random_resize_ratio_and_nearest_labels():
  ex = _example(40, 60)
  rng, ref = np.random.default_rng(3), np.random.default_rng(3)
  out = T.random_resize(ex, rng, scale=(200, 50), ratio_range=(0.5, 2.0))
  r = ref.uniform(0.5, 2.0)
  size = T.rescale_size(40, 60, (int(200 * r), int(50 * r)))
  assert out["image"].shape == size + (3,) and out["label"].shape == size
  # labels: nearest neighbour as mmseg (cv2 INTER_NEAREST: floor(i * src / dst))
  rows = np.floor(np.arange(size[0]) * 40 / size[0]).astype(int)
  cols = np.floor(np.arange(size[1]) * 60 / size[1]).astype(int)
  np.testing.assert_array_equal(out["label"], ex["label"][rows[:, None], cols[None, :]])
  assert set(np.unique(out["label"])) <= set(np.unique(ex["label"]))
  np.testing.assert_allclose(out["image"], _bilinear(ex["image"], size), atol=1)


def _bilinear(img, size):
  """Half-pixel-centre bilinear interpolation with clamped borders (float)."""

  def axis(n_in, n_out):
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, x - i0

  y0, y1, fy = axis(img.shape[0], size[0])
  x0, x1, fx = axis(img.shape[1], size[1])
  f = img.astype(np.float64)
  top = f[y0][:, x0] * (1 - fx)[None, :, None] + f[y0][:, x1] * fx[None, :, None]
  bot = f[y1][:, x0] * (1 - fx)[None, :, None] + f[y1][:, x1] * fx[None, :, None]
  return np.round(top * (1 - fy)[:, None, None] + bot * fy[:, None, None])


def test_image_resize_is_bilinear():
  # upsampling a linear ramp by 2 with pixel-centre alignment stays linear inside
  ramp = np.tile(np.arange(0, 200, 10, dtype=np.uint8)[None, :, None], (4, 1, 3))
  up = T.resize_image(ramp, (8, 40)).astype(np.float64)
  x = (np.arange(40) + 0.5) / 2 - 0.5
  expected = np.interp(x, np.arange(20), np.arange(0, 200, 10))
  np.testing.assert_allclose(up[2, 2:-2, 0], expected[2:-2], atol=1.0)


def _mmseg_crop_bbox(label, size, cat_max_ratio, rng):
  """mmseg RandomCrop.crop_bbox with np.unique, as written there."""

  def gen():
    mh, mw = max(label.shape[0] - size[0], 0), max(label.shape[1] - size[1], 0)
    oh, ow = rng.integers(0, mh + 1), rng.integers(0, mw + 1)
    return oh, oh + size[0], ow, ow + size[1]

  bbox = gen()
  for _ in range(10):
    seg = label[bbox[0] : bbox[1], bbox[2] : bbox[3]]
    labels, cnt = np.unique(seg, return_counts=True)
    cnt = cnt[labels != 255]
    if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
      break
    bbox = gen()
  return bbox


@pytest.mark.parametrize("seed", range(8))
def test_random_crop_matches_mmseg_and_respects_cat_max_ratio(seed):
  label = np.zeros((64, 96), np.uint8)  # mostly class 0: most crops are rejected
  label[20:40, 50:90] = 1
  label[5:15, 5:25] = 255
  image = np.random.default_rng(seed).integers(0, 256, (64, 96, 3)).astype(np.uint8)
  ex = {"image": image, "label": label, "name": "x"}
  out = T.random_crop(ex, np.random.default_rng(seed), size=(24, 32), cat_max_ratio=0.75)
  y0, y1, x0, x1 = _mmseg_crop_bbox(label, (24, 32), 0.75, np.random.default_rng(seed))
  np.testing.assert_array_equal(out["label"], label[y0:y1, x0:x1])
  np.testing.assert_array_equal(out["image"], image[y0:y1, x0:x1])
  ratios = []
  for s in range(50):
    o = T.random_crop(ex, np.random.default_rng(100 + s), size=(24, 32), cat_max_ratio=0.75)
    c = np.bincount(o["label"].ravel(), minlength=256)[:255]
    ratios.append(c.max() / c.sum())
  assert np.mean(np.array(ratios) < 0.75) > 0.9  # rejection sampling works


def test_random_crop_smaller_image_then_pad():
  ex = _example(10, 12)
  out = T.random_crop(ex, np.random.default_rng(0), size=(16, 16))
  assert out["label"].shape == (10, 12)
  out = T.normalize(out, None)
  out = T.pad(out, None, size=(16, 16))
  assert out["image"].shape == (16, 16, 3) and out["label"].shape == (16, 16)
  assert (out["image"][10:] == 0).all() and (out["image"][:, 12:] == 0).all()
  assert (out["label"][10:] == 255).all() and (out["label"][:, 12:] == 255).all()
  np.testing.assert_array_equal(out["label"][:10, :12], ex["label"])


def test_flip_flips_image_and_label_together():
  ex = _example()
  flipped = 0
  for s in range(20):
    rng = np.random.default_rng(s)
    out = T.random_flip(ex, rng, prob=0.5)
    if np.random.default_rng(s).random() < 0.5:
      flipped += 1
      np.testing.assert_array_equal(out["image"], ex["image"][:, ::-1])
      np.testing.assert_array_equal(out["label"], ex["label"][:, ::-1])
    else:
      assert out is ex
  assert 0 < flipped < 20


def _reference_photometric(img, rng):
  """mmseg PhotoMetricDistortion in float HSV (colorsys), same draws."""

  def convert(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

  def hsv_op(x, sat, hue):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:2]):
      h, s, v = colorsys.rgb_to_hsv(*(x[idx] / 255.0))
      if sat is not None:
        s = min(max(s * sat, 0.0), 1.0)
      if hue is not None:
        h = (h + hue * 2 / 360.0) % 1.0
      out[idx] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return out

  if rng.integers(2):
    img = convert(img, beta=rng.uniform(-32, 32))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    img = convert(img, alpha=rng.uniform(0.5, 1.5))
  sat = rng.uniform(0.5, 1.5) if rng.integers(2) else None
  hue = int(rng.integers(-18, 18)) if rng.integers(2) else None
  if sat is not None or hue is not None:
    img = hsv_op(img, sat, hue)
  if mode == 0 and rng.integers(2):
    img = convert(img, alpha=rng.uniform(0.5, 1.5))
  return img


@pytest.mark.parametrize("seed", range(12))
def test_photometric_distortion_against_float_reference(seed):
  g = np.random.default_rng(seed + 50)
  # saturated-enough colours so 8-bit HSV quantisation stays small
  img = (g.uniform(0.3, 1.0, (12, 12, 3)) * 255).astype(np.uint8)
  ex = {"image": img, "label": np.zeros((12, 12), np.uint8), "name": "x"}
  out = T.photometric_distortion(ex, np.random.default_rng(seed))["image"]
  ref = _reference_photometric(img, np.random.default_rng(seed))
  assert out.dtype == np.uint8 and out.shape == img.shape
  err = np.abs(out.astype(int) - ref.astype(int))
  assert err.mean() < 1.0 and err.max() <= 4, (err.mean(), err.max())
  np.testing.assert_array_equal(ex["label"], 0)


def test_normalize_reference():
  ex = _example()
  out = T.normalize(ex, None)["image"]
  ref = (ex["image"].astype(np.float64) - np.array(T.MEAN)) / np.array(T.STD)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_map_labels():
  ex = _example()
  out = T.map_labels(ex, None, mapping={1: 0, 4: 255})["label"]
  ref = ex["label"].copy()
  ref[ex["label"] == 1] = 0
  ref[ex["label"] == 4] = 255
  np.testing.assert_array_equal(out, ref)


def test_make_targets_masks_classes_valid(caplog):
  label = np.full((6, 8), 255, np.uint8)
  label[:2] = 3
  label[2:4, :5] = 0
  label[4:, :] = 7
  label[5, 0] = 1  # smallest class
  ex = {"image": np.zeros((6, 8, 3), np.float32), "label": label, "name": "x"}
  out = T.make_targets(ex, max_segments=5)
  np.testing.assert_array_equal(out["classes"], [0, 1, 3, 7, 0])
  np.testing.assert_array_equal(out["valid"], [1, 1, 1, 1, 0])
  for t, c in enumerate([0, 1, 3, 7]):
    np.testing.assert_array_equal(out["masks"][t], label == c)
  assert out["masks"][4].sum() == 0 and out["label"].dtype == np.int32
  assert (out["masks"].sum(0) == (label != 255)).all()  # ignore in no mask
  caplog.set_level("WARNING")
  out = T.make_targets(ex, max_segments=3)  # too many classes: keep the largest
  np.testing.assert_array_equal(out["classes"], [0, 3, 7])
  assert out["valid"].all()
  with pytest.raises(ValueError, match="normalize"):
    T.make_targets({"image": np.zeros((6, 8, 3), np.uint8), "label": label}, 5)
