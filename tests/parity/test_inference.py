"""Semantic inference: heads vs numpy, mmseg resize / slide / MS+flip semantics."""

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtaclip_jax.evaluation import inference

NUM_CLASSES = 5
_W = np.random.RandomState(0).randn(3, NUM_CLASSES).astype(np.float32)


def pixel_fn(x):
  """Pixel-local (hence translation- and flip-equivariant) scores; padding pixels
  (normalised 0, which no uint8 pixel maps to) get a huge class-0 score, so any
  padding read into the results shows."""
  x = jnp.asarray(x)
  pad = jnp.all(x == 0, axis=-1, keepdims=True)
  return jnp.tanh(x @ _W) + 100.0 * pad * jax.nn.one_hot(0, NUM_CLASSES)


def _image(h, w, seed=1):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _scores(predict_fn, image, settings):
  h, w = image.shape[:2]
  return np.asarray(inference.predict_scores(predict_fn, image, settings))[:h, :w]


# ------------------------------------------------------------------ heads


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_semantic_scores_matches_numpy():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 6, NUM_CLASSES + 1).astype(np.float32)
  masks = rng.randn(2, 6, 7, 9).astype(np.float32)
  want = np.zeros((2, 7, 9, NUM_CLASSES))
  for b in range(2):
    for q in range(6):
      p = _softmax(logits[b, q])[:NUM_CLASSES]
      want[b] += p[None, None, :] * _sigmoid(masks[b, q])[:, :, None]
  got = inference.semantic_scores(logits, masks)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("batched_text", [False, True])
def test_similarity_scores_matches_numpy(batched_text):
  rng = np.random.RandomState(1)
  b, q, k, d, tau = 2, 4, 3, 8, 0.5
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  m = norm(rng.randn(b, q, d)).astype(np.float32)
  t = norm(rng.randn(b if batched_text else 1, k, NUM_CLASSES + 1, d)).astype(np.float32)
  masks = rng.randn(b, q, 5, 6).astype(np.float32)
  want = np.zeros((b, 5, 6, NUM_CLASSES))
  for i in range(b):
    ti = t[i if batched_text else 0]
    for j in range(q):
      sim = np.array(
          [max(m[i, j] @ ti[kk, c] / tau for kk in range(k)) for c in range(NUM_CLASSES + 1)]
      )
      want[i] += _softmax(sim)[:NUM_CLASSES] * _sigmoid(masks[i, j])[:, :, None]
  got = inference.similarity_scores(m, t if batched_text else t[0], masks, tau)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


class _ContractModel(nn.Module):
  """A tiny model with the output contract of CONTRACT.md (L=2 layers)."""

  num_classes: int = NUM_CLASSES
  queries: int = 4
  dim: int = 8
  contexts: int = 2

  @nn.compact
  def __call__(self, images, class_tokens, train=False):
    assert class_tokens.shape == (self.num_classes + 1, 5)
    feat = nn.Conv(self.queries, (4, 4), strides=(4, 4))(images)  # stride 4
    masks = feat.transpose(0, 3, 1, 2)
    pooled = feat.mean(axis=(1, 2))[..., None]  # [B, Q, 1]
    logits = nn.Dense(self.num_classes + 1)(pooled)
    m = nn.Dense(self.dim)(pooled)
    m = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
    t = self.param(
        "t", nn.initializers.normal(1.0), (self.contexts, self.num_classes + 1, self.dim)
    )
    t = jnp.broadcast_to(
        t / jnp.linalg.norm(t, axis=-1, keepdims=True), (images.shape[0],) + t.shape
    )
    stack = lambda x: jnp.stack([jnp.zeros_like(x), x])  # last layer counts
    return dict(logits=stack(logits), masks=stack(masks), m_proj=stack(m), t_proj=stack(t))


@pytest.mark.slow
@pytest.mark.parametrize("head", ["class", "similarity"])
def test_make_predict_fn_uses_last_layer_and_upsamples(head):
  model = _ContractModel()
  images = jnp.asarray(np.random.RandomState(2).randn(1, 32, 48, 3), jnp.float32)
  tokens = np.zeros((NUM_CLASSES + 1, 5), np.int32)
  variables = model.init(jax.random.PRNGKey(0), images, tokens)
  out = model.apply(variables, images, tokens)
  masks = jax.image.resize(out["masks"][-1], (1, 4, 32, 48), "bilinear")
  if head == "class":
    want = inference.semantic_scores(out["logits"][-1], masks)
  else:
    want = inference.similarity_scores(out["m_proj"][-1], out["t_proj"][-1], masks, 0.7)
  predict_fn = inference.make_predict_fn(model, variables, tokens, head=head, tau=0.7)
  got = predict_fn(np.asarray(images))
  assert got.shape == (1, 32, 48, NUM_CLASSES)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  # Stride-4 scores (upsample=False) are upsampled by the inference code.
  low = inference.make_predict_fn(model, variables, tokens, head=head, tau=0.7, upsample=False)(
      images
  )
  assert low.shape == (1, 8, 12, NUM_CLASSES)
  with pytest.raises(ValueError, match="config.eval.head"):
    inference.make_predict_fn(model, variables, tokens, head="mask")


# --------------------------------------------------------------- resizing


@pytest.mark.parametrize(
    "hw,scale,want",
    [
        ((512, 683), (2048, 512), (512, 683)),  # already at the short-side cap
        ((1024, 2048), (2048, 512), (512, 1024)),  # short side caps
        ((2000, 300), (2048, 512), (2048, 307)),  # long side caps (portrait)
        ((256, 341), (2048, 512), (512, 682)),  # upscaling: 341 * 2 = 682
        ((1024, 2048), (1024, 256), (256, 512)),  # ratio 0.5 of (2048, 512)
        ((100, 100), (2048, 1024), (1024, 1024)),
    ],
)
def test_rescale_size_keep_ratio(hw, scale, want):
  assert inference.rescale_size(*hw, scale) == want


@pytest.mark.parity
def test_bilinear_resizes_match_torch():
  import torch  # pylint: disable=g-import-not-at-top

  f = torch.nn.functional
  rng = np.random.RandomState(3)
  image = rng.randint(0, 256, (23, 37, 3)).astype(np.uint8)
  for size in [(11, 17), (50, 61), (23, 20)]:
    ref = (
        f.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None].double(),
            size=size,
            mode="bilinear",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    got = inference.resize_image(image, size).astype(np.float64)
    assert np.abs(got - ref).max() <= 0.5 + 1e-6  # uint8 rounding only

  # Scores: region [:h, :w] of a padded buffer to any output size, on device.
  buf = rng.randn(32, 48, 4).astype(np.float32)
  for valid, out in [((23, 37), (50, 61)), ((23, 37), (11, 17)), ((32, 48), (32, 48))]:
    region = torch.from_numpy(buf[: valid[0], : valid[1]]).permute(2, 0, 1)[None]
    ref = (
        f.interpolate(region, size=out, mode="bilinear", align_corners=False)[0]
        .permute(1, 2, 0)
        .numpy()
    )
    got = inference.resize_region(buf, np.array(valid), np.array(out), (64, 64))
    np.testing.assert_allclose(np.asarray(got)[: out[0], : out[1]], ref, atol=1e-4)
    flipped = np.zeros_like(buf)
    flipped[: valid[0], : valid[1]] = buf[: valid[0], : valid[1]][:, ::-1]
    got = inference.resize_region(flipped, np.array(valid), np.array(out), (64, 64), True)
    np.testing.assert_allclose(np.asarray(got)[: out[0], : out[1]], ref, atol=1e-4)

  # Stride-4 scores upsampled to the input size.
  low = rng.randn(1, 8, 12, 4).astype(np.float32)
  ref = (
      f.interpolate(
          torch.from_numpy(low).permute(0, 3, 1, 2),
          size=(32, 48),
          mode="bilinear",
          align_corners=False,
      )[0]
      .permute(1, 2, 0)
      .numpy()
  )
  np.testing.assert_allclose(np.asarray(inference._fit(low, (32, 48)))[0], ref, atol=1e-4)


@pytest.mark.parity
def test_resize_image_matches_cv2_inter_linear():
  # mmcv imresize = cv2.resize INTER_LINEAR; cv2's 11-bit fixed point rounds
  # differently, so up to one grey level apart.
  rng = np.random.RandomState(4)
  for (h, w), (nh, nw) in [((75, 100), (102, 137)), ((68, 51), (51, 38)), ((37, 53), (20, 90))]:
    image = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
    ref = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(inference.resize_image(image, (nh, nw)).astype(int) - ref).max() <= 1


# ------------------------------------------------------- whole / slide / pad


def test_padding_does_not_leak_and_one_compile_per_bucket():
  traces = []

  @jax.jit
  def predict_fn(x):
    traces.append(x.shape)
    return pixel_fn(x)

  for h, w in [(37, 53), (40, 60), (33, 64)]:  # all pad to (64, 64)
    image = _image(h, w)
    s = inference.Settings(test_scale=(w, h), pad_multiple=32)
    got = _scores(predict_fn, image, s)
    # Padding read into the scores would show as a difference of ~100.
    np.testing.assert_allclose(got, np.asarray(pixel_fn(inference.normalise(image))), atol=1e-4)
    fixed = _scores(predict_fn, image, inference.Settings(test_scale=(w, h), pad_size=(64, 64)))
    np.testing.assert_array_equal(fixed, got)
  assert traces == [(1, 64, 64, 3)]
  with pytest.raises(ValueError, match="pad_size"):
    _scores(pixel_fn, _image(70, 20), inference.Settings(test_scale=(70, 20), pad_size=(64, 64)))


def test_whole_resizes_to_the_test_scale_and_back():
  image = _image(30, 50)
  s = inference.Settings(test_scale=(100, 60))  # resized to (60, 100)
  buf, size = inference.resized_scores(pixel_fn, image, s)
  assert size == (60, 100) and buf.shape == (64, 128, NUM_CLASSES)
  resized = inference.resize_image(image, (60, 100))
  np.testing.assert_allclose(
      np.asarray(buf)[:60, :100], np.asarray(pixel_fn(inference.normalise(resized))), atol=1e-4
  )
  got = _scores(pixel_fn, image, s)
  want = inference.resize_region(buf, np.array(size), np.array((30, 50)), (30, 50))
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
  assert inference.segment(pixel_fn, jnp.asarray(image), s).shape == (30, 50)


def test_slide_windows_cover_and_end_at_the_border():
  windows = inference.slide_windows(10, 23, (6, 8), (4, 5))
  cover = np.zeros((10, 23), int)
  for y1, x1, y2, x2 in windows:
    assert (y2 - y1, x2 - x1) == (6, 8)
    cover[y1:y2, x1:x2] += 1
  assert cover.min() >= 1
  assert {w[2] for w in windows} == {6, 10} and max(w[3] for w in windows) == 23
  # A side smaller than the crop: one window along it, clipped to the image.
  assert inference.slide_windows(4, 8, (6, 8), (4, 5)) == [(0, 0, 4, 8)]


def test_slide_averages_overlapping_windows():
  calls = []

  def counting_fn(x):  # window k scores k everywhere
    calls.append(x.shape)
    return np.full(x.shape[:3] + (NUM_CLASSES,), float(len(calls) - 1), np.float32)

  image = _image(6, 10)
  s = inference.Settings(mode="slide", test_scale=(10, 6), crop_size=(6, 6), stride=(3, 3))
  got = _scores(counting_fn, image, s)[..., 0]
  # Windows x: [0, 6), [3, 9), [4, 10) with scores 0, 1, 2.
  want_row = [0, 0, 0, 0.5, 1, 1, 1.5, 1.5, 1.5, 2]
  np.testing.assert_allclose(got, np.tile(want_row, (6, 1)), atol=1e-6)
  assert calls == [(1, 6, 6, 3)] * 3

  # Two windows per call: the third call slot is a blank window that must not count.
  calls.clear()

  def batched_counting_fn(x):
    calls.append(x.shape)
    k = 2 * (len(calls) - 1) + np.arange(x.shape[0], dtype=np.float32)
    return np.broadcast_to(k[:, None, None, None], x.shape[:3] + (NUM_CLASSES,))

  s = inference.Settings(
      mode="slide", test_scale=(10, 6), crop_size=(6, 6), stride=(3, 3), slide_batch=2
  )
  got = _scores(batched_counting_fn, image, s)[..., 0]
  np.testing.assert_allclose(got, np.tile(want_row, (6, 1)), atol=1e-6)
  assert calls == [(2, 6, 6, 3)] * 2


def test_slide_equals_whole_for_a_pixel_local_model():
  image = _image(45, 70)
  whole = _scores(pixel_fn, image, inference.Settings(test_scale=(70, 45)))
  for crop, stride in [((32, 32), (21, 21)), ((64, 64), (43, 43)), ((16, 48), (16, 40))]:
    s = inference.Settings(
        mode="slide", test_scale=(70, 45), crop_size=crop, stride=stride, slide_batch=3
    )
    np.testing.assert_allclose(_scores(pixel_fn, image, s), whole, atol=1e-5)


# ----------------------------------------------------------------- MS + flip


def test_flip_of_an_equivariant_model_changes_nothing():
  image = _image(37, 50)
  base = dict(test_scale=(50, 37), scales=(1.0,), flip=True)
  whole = _scores(pixel_fn, image, inference.Settings(test_scale=(50, 37)))
  soft = _scores(pixel_fn, image, inference.Settings(mode="ms_flip", **base))
  np.testing.assert_allclose(soft, np.asarray(jax.nn.softmax(whole, -1)), atol=1e-6)
  raw = _scores(pixel_fn, image, inference.Settings(mode="ms_flip", tta_softmax=False, **base))
  np.testing.assert_allclose(raw, whole, atol=1e-5)


def test_flip_is_undone_within_the_image_not_the_padding():
  def column_fn(x):  # score = column index of the padded input
    cols = jnp.arange(x.shape[2], dtype=jnp.float32)
    return jnp.broadcast_to(cols[None, None, :, None], x.shape[:3] + (NUM_CLASSES,))

  image = _image(20, 45)  # padded to 64 columns
  s = inference.Settings(
      mode="ms_flip", test_scale=(45, 20), scales=(1.0,), flip=True, tta_softmax=False
  )
  # (x + (44 - x)) / 2 everywhere.
  np.testing.assert_allclose(_scores(column_fn, image, s), 22.0, atol=1e-5)


@pytest.mark.parametrize("pass_mode", ["whole", "slide"])
def test_multi_scale_averages_passes_at_ratios_of_the_test_scale(pass_mode):
  image = _image(30, 40)
  slide = dict(crop_size=(24, 24), stride=(16, 16))
  s = inference.Settings(
      mode="ms_flip",
      test_scale=(80, 60),
      scales=(0.5, 1.25),
      flip=False,
      ms_mode=pass_mode,
      tta_softmax=False,
      **slide,
  )
  got = _scores(pixel_fn, image, s)
  want = 0
  for scale in [(40, 30), (100, 75)]:
    single = inference.Settings(mode=pass_mode, test_scale=scale, **slide)
    want = want + _scores(pixel_fn, image, single) / 2
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_settings_from_config():
  cfg = ml_collections.ConfigDict(
      dict(
          mode="ms_flip",
          crop_size=(512, 512),
          stride=(341, 341),
          scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
          flip=True,
          test_scale=(2048, 512),
          split="val",
          max_images=0,
          head="class",
      )
  )
  s = inference.Settings.from_config(cfg)
  assert s.pass_mode == "whole" and len(s.augmentations) == 12
  assert s.augmentations[:2] == [(0.5, False), (0.5, True)]
  assert s.crop_size == (512, 512) and s.pad_size is None
  cfg.mode = "slide"
  assert inference.Settings.from_config(cfg).augmentations == [(1.0, False)]
  cfg.mode = "sliding"
  with pytest.raises(ValueError, match="config.eval.mode"):
    inference.Settings.from_config(cfg)
  with pytest.raises(ValueError, match="crop_size"):
    inference.Settings.from_config(dict(mode="slide", test_scale=(2048, 512)))
  with pytest.raises(ValueError, match="test_scale"):
    inference.Settings.from_config(dict(mode="whole"))
