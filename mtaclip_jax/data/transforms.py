"""Registered data transforms (mmsegmentation semantics) and the spec parser.

A pipeline is a list of strings such as

    ["random_resize(scale=(2048, 512), ratio_range=(0.5, 2.0))",
     "random_crop(size=(512, 512), cat_max_ratio=0.75)",
     "random_flip(prob=0.5)", "photometric_distortion()", "normalize()",
     "pad(size=(512, 512))"]

(or one string joined by "|"). Each name is a registered function
`op(example, rng, **kwargs) -> example`; kwargs are Python literals. An example
is `{"image": [H, W, 3], "label": uint8 [H, W] (255 = ignore), "name": str}`;
images stay uint8 until `normalize`.
"""

import ast
import inspect
import logging

import cv2
import numpy as np

from mtaclip_jax import errors
from mtaclip_jax.data import classes

IGNORE = classes.IGNORE_LABEL
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
REGISTRY = {}
log = logging.getLogger(__name__)


def register(fn):
  REGISTRY[fn.__name__] = fn
  return fn


def parse(specs):
  """Spec strings -> [(name, kwargs)], checked against the registry."""
  if isinstance(specs, str):
    specs = [s for s in specs.split("|") if s.strip()]
  ops = []
  for spec in specs:
    try:
      node = ast.parse(spec.strip(), mode="eval").body
      if isinstance(node, ast.Name):
        name, args, kwargs = node.id, [], {}
      elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
      else:
        raise ValueError("not a call")
    except (SyntaxError, ValueError) as e:
      raise ValueError(
          f"config.data.transforms entry {spec!r}: expected name(key=literal, ...)" f" ({e})"
      ) from e
    if name not in REGISTRY:
      raise ValueError(
          f"config.data.transforms entry {spec!r}: unknown transform "
          f"{name!r}, expected one of {sorted(REGISTRY)}"
      )
    try:
      bound = inspect.signature(REGISTRY[name]).bind(None, None, *args, **kwargs)
    except TypeError as e:
      raise ValueError(f"config.data.transforms entry {spec!r}: {e}") from e
    ops.append((name, {k: v for k, v in bound.arguments.items() if k not in ("example", "rng")}))
  return ops


def op_arg(name, kwargs, key):
  """An op's argument as given in the spec, else the registered function's default."""
  if key in kwargs:
    return kwargs[key]
  return inspect.signature(REGISTRY[name]).parameters[key].default


def unpadded_crop(ops):
  """Index of the last random_crop when no pad follows it (padding disabled), else None."""
  crops = [i for i, (name, _) in enumerate(ops) if name == "random_crop"]
  if not crops or any(name == "pad" for name, _ in ops[crops[-1] :]):
    return None
  return crops[-1]


def apply(ops, example, rng):
  last_crop = unpadded_crop(ops)
  for i, (name, kwargs) in enumerate(ops):
    if i == last_crop:
      size = tuple(op_arg(name, kwargs, "size"))
      h, w = example["label"].shape
      if h < size[0] or w < size[1]:
        raise errors.CropConfigError(
            f"{example.get('name')}: {h}x{w} (HxW) before random_crop(size={size}) and "
            "config.data.transforms has no pad(...) after the crop, so the batch "
            f"cannot be formed; add pad(size={size}) after random_crop or lower "
            "config.data.crop_size"
        )
    example = REGISTRY[name](example, rng, **kwargs)
  return example


# ---------------------------------------------------------------- geometry


def rescale_size(height, width, scale):
  """mmcv.rescale_size with keep_ratio: fit the long side to max(scale) and the
  short side to min(scale), whichever is tighter. Returns (new_h, new_w)."""
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(height, width), short_edge / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image, size):
  """Bilinear resize of a uint8 [H, W, 3] image to size (h, w) (cv2 INTER_LINEAR,
  as mmcv.imresize: no antialiasing)."""
  if image.shape[:2] == tuple(size):
    return image
  return cv2.resize(np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label, size):
  """Nearest-neighbour resize of a uint8 label map (cv2 INTER_NEAREST, as mmseg:
  source index floor(i * src / dst)); never interpolates values."""
  if label.shape == tuple(size):
    return label
  return cv2.resize(
      np.ascontiguousarray(label), (size[1], size[0]), interpolation=cv2.INTER_NEAREST
  )


def _resize_example(example, size):
  return dict(
      example,
      image=resize_image(example["image"], size),
      label=resize_label(example["label"], size),
  )


@register
def resize(example, rng, scale=(2048, 512)):
  """Test-time resize keeping the aspect ratio (mmseg Resize, keep_ratio=True)."""
  del rng
  h, w = example["image"].shape[:2]
  return _resize_example(example, rescale_size(h, w, scale))


@register
def random_resize(example, rng, scale=(2048, 512), ratio_range=(0.5, 2.0)):
  """mmseg RandomResize(scale, ratio_range, keep_ratio=True)."""
  ratio = rng.uniform(*ratio_range)
  target = (int(scale[0] * ratio), int(scale[1] * ratio))
  h, w = example["image"].shape[:2]
  return _resize_example(example, rescale_size(h, w, target))


def crop_box(label, size, cat_max_ratio, rng):
  """mmseg RandomCrop.crop_bbox: up to 10 re-draws until no class covers
  cat_max_ratio or more of the non-ignored crop pixels."""
  h, w = label.shape

  def draw():
    y = int(rng.integers(0, max(h - size[0], 0) + 1))
    x = int(rng.integers(0, max(w - size[1], 0) + 1))
    return y, x

  y, x = draw()
  if cat_max_ratio < 1.0:
    for _ in range(10):
      cnt = np.bincount(label[y : y + size[0], x : x + size[1]].ravel(), minlength=256)
      cnt = cnt[:IGNORE][cnt[:IGNORE] > 0]
      if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
        break
      y, x = draw()
  return y, x


@register
def random_crop(example, rng, size=(512, 512), cat_max_ratio=0.75):
  """mmseg RandomCrop(crop_size=size, cat_max_ratio); size is (h, w)."""
  y, x = crop_box(example["label"], size, cat_max_ratio, rng)
  sl = (slice(y, y + size[0]), slice(x, x + size[1]))
  return dict(example, image=example["image"][sl], label=example["label"][sl])


@register
def random_flip(example, rng, prob=0.5):
  """Horizontal flip of image and label with probability prob."""
  if rng.random() < prob:
    return dict(example, image=example["image"][:, ::-1], label=example["label"][:, ::-1])
  return example


# ---------------------------------------------------------------- photometric


def _convert_lut(alpha=1.0, beta=0.0):
  """mmseg's convert (x * alpha + beta in float32, clipped, truncated to uint8) as
  a 256-entry table; applying it to uint8 pixels is exactly convert()."""
  x = np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta)
  return np.clip(x, 0, 255).astype(np.uint8)


@register
def photometric_distortion(
    example,
    rng,
    brightness_delta=32,
    contrast_range=(0.5, 1.5),
    saturation_range=(0.5, 1.5),
    hue_delta=18,
):
  """mmseg PhotoMetricDistortion: random brightness, contrast (before or after
  the colour changes), saturation, hue; each applied with probability 0.5.

  Same random draws and per-pixel maths as mmseg (OpenCV 8-bit HSV, hue in
  units of 2 degrees), with brightness/contrast/saturation as lookup tables and
  one HSV round trip for saturation and hue together (mmseg makes two; the
  difference is 8-bit rounding).
  """
  img = np.ascontiguousarray(example["image"])
  before = None
  if rng.integers(2):
    before = _convert_lut(beta=rng.uniform(-brightness_delta, brightness_delta))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    contrast = _convert_lut(alpha=rng.uniform(*contrast_range))
    before = contrast if before is None else contrast[before]
  if before is not None:
    img = cv2.LUT(img, before)
  sat = rng.uniform(*saturation_range) if rng.integers(2) else None
  hue = int(rng.integers(-hue_delta, hue_delta)) if rng.integers(2) else None
  if sat is not None or hue is not None:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    if sat is not None:
      hsv[..., 1] = cv2.LUT(hsv[..., 1], _convert_lut(alpha=sat))
    if hue is not None:
      hsv[..., 0] = ((np.arange(256) + hue) % 180).astype(np.uint8)[hsv[..., 0]]
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if mode == 0 and rng.integers(2):
    img = cv2.LUT(img, _convert_lut(alpha=rng.uniform(*contrast_range)))
  return dict(example, image=img)


# ---------------------------------------------------------------- finishing


@register
def normalize(example, rng, mean=MEAN, std=STD):
  """(image - mean) / std as float32 (RGB order); one table lookup per pixel
  for uint8 images (same float32 maths as the direct formula)."""
  del rng
  image = example["image"]
  mean, inv_std = np.asarray(mean, np.float32), 1.0 / np.asarray(std, np.float32)
  if image.dtype == np.uint8 and image.shape[-1] == len(mean):
    table = (np.arange(256, dtype=np.float32)[:, None] - mean) * inv_std
    image = cv2.LUT(np.ascontiguousarray(image), table.reshape(1, 256, -1))
  else:
    image = (image.astype(np.float32) - mean) * inv_std
  return dict(example, image=image)


@register
def pad(example, rng, size=(512, 512), image_value=0.0, label_value=IGNORE):
  """Pads bottom/right to size (h, w): image with image_value, label with label_value."""
  del rng
  image, label = example["image"], example["label"]
  h, w = label.shape
  if h > size[0] or w > size[1]:
    raise ValueError(
        f"{example.get('name')}: {h}x{w} is larger than pad size {size}; "
        "put random_crop before pad"
    )
  if (h, w) == tuple(size):
    return example
  out_img = np.full((size[0], size[1], image.shape[2]), image_value, image.dtype)
  out_img[:h, :w] = image
  out_lab = np.full(tuple(size), label_value, label.dtype)
  out_lab[:h, :w] = label
  return dict(example, image=out_img, label=out_lab)


@register
def map_labels(example, rng, mapping=None):
  """Remaps label values with a {from: to} dict (e.g. merging classes); others kept."""
  del rng
  lut = np.arange(256, dtype=np.uint8)
  for src, dst in (mapping or {}).items():
    lut[int(src)] = int(dst)
  return dict(example, label=lut[example["label"]])


_warned_segments = []


def make_targets(example, max_segments):
  """Final training example: float32 image, int32 label, and one binary mask per
  class present (ignore excluded), padded to max_segments with `valid`."""
  label = np.ascontiguousarray(example["label"])
  counts = np.bincount(label.ravel(), minlength=256)[:IGNORE]
  present = np.nonzero(counts)[0]
  if len(present) > max_segments:
    if not _warned_segments:
      _warned_segments.append(True)
      log.warning(
          "%s has %d classes, more than data.max_segments=%d: keeping the " "largest (warned once)",
          example.get("name"),
          len(present),
          max_segments,
      )
    order = np.argsort(-counts[present], kind="stable")[:max_segments]
    present = np.sort(present[order])
  n = len(present)
  masks = np.zeros((max_segments,) + label.shape, np.uint8)
  np.equal(label[None], present[:, None, None].astype(label.dtype), out=masks[:n].view(bool))
  cls = np.zeros(max_segments, np.int32)
  cls[:n] = present
  image = example["image"]
  if image.dtype != np.float32:
    raise ValueError(
        "the transform list must end with normalize (and pad): got a " f"{image.dtype} image"
    )
  return {
      "image": np.ascontiguousarray(image),
      "label": label.astype(np.int32),
      "masks": masks,
      "classes": cls,
      "valid": np.arange(max_segments) < n,
  }
