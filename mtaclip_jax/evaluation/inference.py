"""Semantic inference: per-pixel class scores of one image, whole / slide / MS+flip.

The model part is a `predict_fn(images [B, H, W, 3] normalised float32) -> scores
[B, h, w, C]` callable (h, w = H, W or the stride-4 size: scores are upsampled to the
input size when they are smaller); `make_predict_fn` builds it from the flax model.
Everything else follows mmseg's test path:

- `Resize(scale=test_scale, keep_ratio=True)` (`rescale_size`; a side that would
  round to 0 pixels, as 1x600 at (160, 128), stays 1), bilinear with half-pixel
  centres and no antialiasing (cv2 INTER_LINEAR), result kept uint8;
- normalise with the recipe's mean/std (docs/RECIPES.md); pad bottom/right with 0 to a static
  size (a multiple of `pad_multiple`, or the fixed `pad_size`) so jit compiles once
  per size bucket, not once per image;
- "whole": one pass; "slide": mmseg `slide_inference` windows of `crop_size` every
  `stride`, overlapping scores averaged; "ms_flip": mmseg `aug_test` over the
  ratios `scales` of `test_scale` and horizontal flips, each pass whole or slide
  (`ms_mode`), softmax-ed over classes (`tta_softmax`) and averaged;
- scores are cropped to the resized image and resized bilinearly
  (align_corners=False, as torch) to the original size; `segment` resizes and
  takes the argmax a tile of rows at a time (`pass_labels`), so an image of any
  size holds at most LABEL_TILE_BYTES of original-size scores.

Device work uses static shapes: scores of the resized image live in a buffer of its
padded size and of the original image in a buffer of the original size rounded up
to `out_multiple`; the true sizes are traced int32 scalars. Unlike mmseg (batch 1,
no padding), the model sees the zero padding; results agree away from it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtaclip_jax.models import mtaclip

MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
MODES = ("whole", "slide", "ms_flip")
# The largest tile of original-size class scores `pass_labels` holds at once.
LABEL_TILE_BYTES = 64 << 20

PredictFn = Callable[[Any], Any]


# --------------------------------------------------------------------------- heads


def semantic_scores(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Mask2Former semantic inference.

  score_c(x) = sum_q softmax(logits_q)[c] * sigmoid(masks_q(x)), c < C ("none",
  the last of the C+1 classes, is dropped). Only mask queries are passed in: text
  queries do not vote.

  Args:
    logits: [B, Q, C+1] class logits of the mask queries.
    masks: [B, Q, h, w] mask logits.

  Returns:
    [B, h, w, C] float32.
  """
  num_classes = logits.shape[-1] - 1
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)[..., :num_classes]
  return jnp.einsum("bqc,bqhw->bhwc", probs, jax.nn.sigmoid(jnp.asarray(masks, jnp.float32)))


def similarity_scores(
    m_proj: jax.Array, t_proj: jax.Array, masks: jax.Array, tau: float = 1.0
) -> jax.Array:
  """Open-vocabulary semantic inference from mask-text similarities.

  With S(m'_q, t'_{c,k}) = m'_q . t'_{c,k} / tau (paper Eq. 6), each mask query gets
  class probabilities p_{q,c} = softmax_c(max_k S(m'_q, t'_{c,k})) over the C+1
  classes ("none" last, K prompts per class), then as `semantic_scores`:
  score_c(x) = sum_q p_{q,c} * sigmoid(masks_q(x)), c < C.

  Args:
    m_proj: [B, Q, D] L2-normalised mask embeddings.
    t_proj: [B, K, C+1, D] or [K, C+1, D] L2-normalised text embeddings.
    masks: [B, Q, h, w] mask logits.
    tau: similarity temperature.

  Returns:
    [B, h, w, C] float32.
  """
  m_proj = jnp.asarray(m_proj, jnp.float32)
  t_proj = jnp.asarray(t_proj, jnp.float32)
  if t_proj.ndim == 3:
    t_proj = jnp.broadcast_to(t_proj[None], (m_proj.shape[0],) + t_proj.shape)
  sim = jnp.einsum("bqd,bkcd->bqkc", m_proj, t_proj) / tau
  return semantic_scores(sim.max(axis=2), masks)


def make_predict_fn(
    model, variables, class_tokens, head: str = "class", tau: float = 1.0, upsample: bool = True
) -> PredictFn:
  """A jitted `predict_fn(images) -> scores [B, H, W, C]` for an MTA-CLIP model.

  Encodes the class prompts once (`text_embeddings`), then calls
  `model.apply(variables, images, class_tokens, train=False, text_embeddings=t0)`
  (CONTRACT.md) per batch and reads the last supervised layer. With `upsample` the
  stride-4 mask logits are resized to the input size before the sigmoid, as mmseg's
  Mask2Former head does.
  The variables are arguments of the jitted function, not baked-in constants.

  Args:
    model: the flax module of `mtaclip.build_model`.
    variables: {"params": ..., "batch_stats": ...}.
    class_tokens: [C+1, class_length] int32 (class names + "none").
    head: "class" (class logits) or "similarity" (mask-text similarities; needs a
      model with text queries).
    tau: temperature of the similarity head.
    upsample: resize mask logits to the input size inside the function.
  """
  if head not in ("class", "similarity"):
    raise ValueError(f"config.eval.head: expected 'class' or 'similarity', got {head!r}")
  jitted = _cached(_jitted_scores, model, head, float(tau), bool(upsample))
  class_tokens = jnp.asarray(class_tokens, jnp.int32)
  t0 = text_embeddings(model, variables, class_tokens)
  return lambda images: jitted(variables, class_tokens, t0, jnp.asarray(images, jnp.float32))


# One jitted function per (model, head, tau, upsample), kept across calls: a training
# run evaluates every few thousand steps, and a new jax.jit each time would trace and
# lower the whole model again (seconds on a paper model) before the cache finds the
# compiled program. Flax modules compare and hash by their fields, so equal configs
# share one function; jax.jit still traces once per input shape.
@functools.lru_cache(maxsize=16)
def _jitted_scores(model, head: str, tau: float, upsample: bool):
  def apply(variables, class_tokens, t0, images):
    out = apply_model(model, variables, images, class_tokens, t0)
    masks = out["masks"][-1]
    if upsample:
      b, q = masks.shape[:2]
      masks = jax.image.resize(masks.astype(jnp.float32), (b, q) + images.shape[1:3], "bilinear")
    if head == "class":
      return semantic_scores(out["logits"][-1], masks)
    if "m_proj" not in out:
      raise ValueError(
          "config.eval.head='similarity' needs a model with text queries and the "
          "similarity heads (config.model.text_queries=True, "
          "config.model.similarity_heads=True): the outputs have no m_proj"
      )
    return similarity_scores(out["m_proj"][-1], out["t_proj"][-1], masks, tau)

  return jax.jit(apply)


@functools.lru_cache(maxsize=16)
def _jitted_text(model):
  return jax.jit(lambda v, ct: mtaclip.encode_classes(model, v, ct))


def text_embeddings(model, variables, class_tokens):
  """`mtaclip.encode_classes`, jitted: the text tower runs once per class list, not
  once per image (it is most of the full model's inference FLOPs). None for the
  baseline and for other modules that follow the call contract."""
  if not (isinstance(model, mtaclip.MTACLIP) and model.text_queries):
    return None
  return _cached(_jitted_text, model)(variables, jnp.asarray(class_tokens, jnp.int32))


def _cached(make, *key):
  """make(*key) through its lru_cache, or a fresh one for a module that cannot be
  hashed (a field holding a list or dict)."""
  try:
    hash(key)
  except TypeError:
    return make.__wrapped__(*key)
  return make(*key)


def apply_model(model, variables, images, class_tokens, t0):
  """`model.apply(..., train=False)`, with the cached text embeddings when there are."""
  kw = {} if t0 is None else {"text_embeddings": t0}
  return model.apply(variables, images, class_tokens, train=False, **kw)


# ------------------------------------------------------------------ settings


def _pair(value, name: str) -> tuple[int, int] | None:
  if value is None:
    return None
  if isinstance(value, (int, np.integer)):
    return int(value), int(value)
  value = tuple(int(v) for v in value)
  if len(value) != 2 or min(value) <= 0:
    raise ValueError(f"config.eval.{name}: expected a positive int or (h, w), got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class Settings:
  """Test-time settings; `from_config(config.eval)` reads them from the config.

  test_scale: mmseg Resize scale, e.g. (2048, 512): the long side is at most the
    larger value and the short side at most the smaller.
  crop_size, stride: slide window and step, (h, w).
  scales: ratios of `test_scale` for "ms_flip"; flip: add horizontal flips there.
  pad_size: fixed padded (h, w) of the resized image (one compile); otherwise the
    resized image is padded to a multiple of `pad_multiple`.
  out_multiple: scores at the original size live in a buffer rounded up to this.
  ms_mode: "whole" or "slide" for each pass of "ms_flip".
  slide_batch: windows per predict_fn call in slide mode (the last call is padded
    with blank windows, so the batch shape and the compile stay fixed).
  tta_softmax: softmax over classes before averaging "ms_flip" passes (mmseg).
  """

  mode: str = "whole"
  test_scale: tuple[int, int] = (2048, 512)
  crop_size: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False
  pad_size: tuple[int, int] | None = None
  pad_multiple: int = 32
  out_multiple: int = 128
  ms_mode: str = "whole"
  tta_softmax: bool = True
  slide_batch: int = 1

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"config.eval.mode: expected one of {MODES}, got {self.mode!r}")
    if self.ms_mode not in ("whole", "slide"):
      raise ValueError(
          f"config.eval.ms_mode: expected 'whole' or 'slide', got " f"{self.ms_mode!r}"
      )
    if self.pass_mode == "slide" and (self.crop_size is None or self.stride is None):
      raise ValueError(
          "config.eval.crop_size and config.eval.stride are needed for " "slide inference"
      )
    if self.mode == "ms_flip" and not self.scales:
      raise ValueError("config.eval.scales: expected at least one ratio for ms_flip")
    if min(self.pad_multiple, self.out_multiple, self.slide_batch) <= 0:
      raise ValueError("config.eval.pad_multiple / out_multiple / slide_batch must be " "positive")

  @property
  def pass_mode(self) -> str:
    """How one resized image is run: "whole" or "slide"."""
    return self.ms_mode if self.mode == "ms_flip" else self.mode

  @property
  def augmentations(self) -> list[tuple[float, bool]]:
    """(ratio of test_scale, flip) of every pass."""
    if self.mode != "ms_flip":
      return [(1.0, False)]
    flips = (False, True) if self.flip else (False,)
    return [(float(r), f) for r in self.scales for f in flips]

  @classmethod
  def from_config(cls, cfg) -> "Settings":
    """From `config.eval` (a ConfigDict or a dict); absent optional keys = defaults."""
    get = cfg.get
    defaults = cls()
    if get("test_scale", None) is None:
      raise ValueError("config.eval.test_scale: expected (long, short), e.g. (2048, 512)")
    return cls(
        mode=get("mode", defaults.mode),
        test_scale=_pair(get("test_scale", None), "test_scale"),
        crop_size=_pair(get("crop_size", None), "crop_size"),
        stride=_pair(get("stride", None), "stride"),
        scales=tuple(float(s) for s in (get("scales", None) or (1.0,))),
        flip=bool(get("flip", False)),
        pad_size=_pair(get("pad_size", None) or None, "pad_size"),
        pad_multiple=int(get("pad_multiple", defaults.pad_multiple)),
        out_multiple=int(get("out_multiple", defaults.out_multiple)),
        ms_mode=get("ms_mode", defaults.ms_mode),
        tta_softmax=bool(get("tta_softmax", defaults.tta_softmax)),
        slide_batch=int(get("slide_batch", defaults.slide_batch)),
    )


# ------------------------------------------------------------ host-side image ops


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
  """mmcv `rescale_size` (keep_ratio): the largest size within the long/short caps.

  A side that would round to 0 (a 1x600 image at test_scale (160, 128)) is kept at
  1 pixel, where mmcv would fail; any other size is mmcv's."""
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(height, width), short_edge / min(height, width))
  return max(int(height * float(factor) + 0.5), 1), max(int(width * float(factor) + 0.5), 1)


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices i0, i1 and weight of i1 of bilinear resizing, half-pixel centres
  and edge clamping (torch align_corners=False, cv2 INTER_LINEAR)."""
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of uint8 [H, W, 3] to `size` (h, w), rounded back to uint8."""
  image = np.asarray(image)
  if image.shape[:2] == tuple(size):
    return image
  i0, i1, wy = linear_taps(image.shape[0], size[0])
  # Only the rows read are converted to float (a large photo's float copy would be
  # 12 bytes per pixel).
  x = image[i0].astype(np.float32) * (1 - wy)[:, None, None]
  x = x + image[i1].astype(np.float32) * wy[:, None, None]
  j0, j1, wx = linear_taps(image.shape[1], size[1])
  x = x[:, j0] * (1 - wx)[None, :, None] + x[:, j1] * wx[None, :, None]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def normalise(image: np.ndarray) -> np.ndarray:
  return (np.asarray(image, np.float32) - MEAN) / STD


def round_up(size: Sequence[int], multiple: int) -> tuple[int, int]:
  return tuple(-(-int(s) // multiple) * multiple for s in size)


def padded_size(size: tuple[int, int], settings: Settings) -> tuple[int, int]:
  if settings.pad_size is None:
    return round_up(size, settings.pad_multiple)
  if size[0] > settings.pad_size[0] or size[1] > settings.pad_size[1]:
    raise ValueError(
        f"config.eval.pad_size {settings.pad_size} is smaller than an image "
        f"resized to {size} by test_scale {settings.test_scale}"
    )
  return settings.pad_size


def pad_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  out = np.zeros(tuple(size) + image.shape[2:], image.dtype)
  out[: image.shape[0], : image.shape[1]] = image
  return out


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
  """mmseg `slide_inference` windows (y1, x1, y2, x2); the last ones are shifted
  back so they end at the border; a side smaller than the crop gives one window."""
  grids_h = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
  grids_w = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
  windows = []
  for i in range(grids_h):
    for j in range(grids_w):
      y2 = min(i * stride[0] + crop[0], height)
      x2 = min(j * stride[1] + crop[1], width)
      windows.append((max(y2 - crop[0], 0), max(x2 - crop[1], 0), y2, x2))
  return windows


# ----------------------------------------------------------- device-side score ops


@functools.partial(jax.jit, static_argnames="size")
def _fit(scores, size):
  """[B, h, w, C] -> [B, H, W, C]: bilinear upsampling to the input size if needed."""
  scores = jnp.asarray(scores, jnp.float32)
  if scores.shape[1:3] != tuple(size):
    b, c = scores.shape[0], scores.shape[-1]
    scores = jax.image.resize(scores, (b,) + tuple(size) + (c,), "bilinear")
  return scores


def _device_taps(in_size, out_size, length, start=0):
  """`linear_taps` with traced sizes, of the static number `length` of outputs from
  output index `start` (traced) on."""
  scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  index = (jnp.arange(length, dtype=jnp.int32) + start).astype(jnp.float32)
  src = jnp.maximum((index + 0.5) * scale - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  return i0, i1, src - i0.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("out_shape", "flip"))
def resize_region(buf, valid, out_size, out_shape, flip=False, row0=0):
  """Bilinear resize of buf[:valid[0], :valid[1]] to out_size, torch semantics;
  the output rows row0 .. row0 + out_shape[0] (a tile of a large image).

  Args:
    buf: [Hb, Wb, C] scores of a padded image.
    valid: int32 (h, w) of the real region of `buf`.
    out_size: int32 (H, W) wanted; traced, so any size reuses one compile.
    out_shape: static (Ho, Wo) >= out_size of the returned buffer; rows/columns
      past out_size repeat the border.
    flip: the region was computed on a horizontally flipped image: flip it back.
    row0: first output row (traced int32).
  """
  valid = jnp.asarray(valid, jnp.int32)
  out_size = jnp.asarray(out_size, jnp.int32)
  if flip:
    cols = jnp.clip(valid[1] - 1 - jnp.arange(buf.shape[1]), 0, buf.shape[1] - 1)
    buf = jnp.take(buf, cols, axis=1)
  i0, i1, wy = _device_taps(valid[0], out_size[0], out_shape[0], row0)
  x = buf[i0] * (1 - wy)[:, None, None] + buf[i1] * wy[:, None, None]
  j0, j1, wx = _device_taps(valid[1], out_size[1], out_shape[1])
  return x[:, j0] * (1 - wx)[None, :, None] + x[:, j1] * wx[None, :, None]


@functools.partial(jax.jit, donate_argnums=0)
def _add_windows(buf, scores, offsets, used):
  """buf[y1:y1+h, x1:x1+w] += scores[i] for the windows i with used[i]."""

  def add(i, buf):
    start = (offsets[i, 0], offsets[i, 1], 0)
    old = jax.lax.dynamic_slice(buf, start, scores.shape[1:])
    return jax.lax.dynamic_update_slice(buf, old + used[i] * scores[i], start)

  return jax.lax.fori_loop(0, scores.shape[0], add, buf)


@functools.partial(jax.jit, static_argnames="softmax", donate_argnums=0)
def _add_pass(total, scores, weight, softmax):
  if softmax:
    scores = jax.nn.softmax(scores, axis=-1)
  return total + weight * scores


# ------------------------------------------------------------------- inference


def _run_whole(predict_fn: PredictFn, image: np.ndarray, settings: Settings):
  size = padded_size(image.shape[:2], settings)
  x = pad_image(normalise(image), size)
  return _fit(predict_fn(x[None]), size)[0]


def _run_slide(predict_fn: PredictFn, image: np.ndarray, settings: Settings):
  crop, stride = settings.crop_size, settings.stride
  h, w = image.shape[:2]
  size = padded_size((h, w), settings)
  size = (max(size[0], crop[0]), max(size[1], crop[1]))
  x = normalise(image)
  count = np.zeros(size, np.float32)
  windows = slide_windows(h, w, crop, stride)
  n = settings.slide_batch
  buf = None
  for start in range(0, len(windows), n):
    group = windows[start : start + n]
    batch = np.zeros((n,) + tuple(crop) + (3,), np.float32)
    offsets = np.zeros((n, 2), np.int32)
    used = np.zeros((n,), np.float32)
    for i, (y1, x1, y2, x2) in enumerate(group):
      batch[i, : y2 - y1, : x2 - x1] = x[y1:y2, x1:x2]
      offsets[i], used[i] = (y1, x1), 1.0
      count[y1:y2, x1:x2] += 1
    scores = _fit(predict_fn(batch), crop)
    if buf is None:
      buf = jnp.zeros(size + scores.shape[-1:], jnp.float32)
    buf = _add_windows(buf, scores, offsets, used)
  # Outside the image nothing is read later; avoid dividing by zero there.
  return buf / jnp.asarray(np.maximum(count, 1.0))[:, :, None]


def resized_scores(
    predict_fn: PredictFn,
    image: np.ndarray,
    settings: Settings,
    ratio: float = 1.0,
    flip: bool = False,
):
  """One pass: scores of the image resized to `ratio` x test_scale (and flipped).

  Returns:
    (buffer [Hb, Wb, C] jax float32, (h, w) of the resized image inside it). With
    `flip` the buffer holds the flipped image's scores (see `resize_region`).
  """
  scale = tuple(int(s * ratio) for s in settings.test_scale)
  size = rescale_size(image.shape[0], image.shape[1], scale)
  resized = resize_image(image, size)
  if flip:
    resized = resized[:, ::-1]
  run = _run_slide if settings.pass_mode == "slide" else _run_whole
  return run(predict_fn, resized, settings), size


def predict_scores(predict_fn: PredictFn, image, settings: Settings):
  """Class scores of `image` at its original size.

  Args:
    predict_fn: normalised images [1, H, W, 3] -> scores [1, h, w, C].
    image: uint8 [H, W, 3] (numpy or jax).
    settings: `Settings`.

  Returns:
    jax float32 [Ho, Wo, C] with (Ho, Wo) = (H, W) rounded up to
    `settings.out_multiple`; only [:H, :W] is meaningful.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image: expected [H, W, 3] uint8, got shape {image.shape}")
  out_size = np.asarray(image.shape[:2], np.int32)
  out_shape = round_up(image.shape[:2], settings.out_multiple)
  augs = settings.augmentations
  total = None
  for ratio, flip in augs:
    buf, size = resized_scores(predict_fn, image, settings, ratio, flip)
    scores = resize_region(buf, np.asarray(size, np.int32), out_size, out_shape, flip)
    if len(augs) == 1:
      return scores
    if total is None:
      total = jnp.zeros_like(scores)
    total = _add_pass(total, scores, 1.0 / len(augs), settings.tta_softmax)
  return total


def tile_rows(height: int, width: int, classes: int, settings: Settings) -> int:
  """Rows per tile of the label map: the whole image (rounded up to out_multiple)
  when the scores of that many rows fit in LABEL_TILE_BYTES, else the most rows (a
  multiple of 8, at least 8) that do."""
  whole = round_up((height,), settings.out_multiple)[0]
  row_bytes = 4 * classes * round_up((width,), settings.out_multiple)[0]
  return int(min(whole, max(8, LABEL_TILE_BYTES // row_bytes // 8 * 8)))


@functools.partial(jax.jit, static_argnames=("out_shape", "flips", "softmax"))
def _label_tile(bufs, valids, out_size, row0, out_shape, flips, softmax):
  """argmax over classes of rows row0 .. row0 + out_shape[0] of the passes' scores
  at the original size, averaged over the passes as `predict_scores` does."""
  if len(bufs) == 1:
    total = resize_region(bufs[0], valids[0], out_size, out_shape, flips[0], row0)
  else:
    total = jnp.zeros(out_shape + bufs[0].shape[-1:], jnp.float32)
    for buf, valid, flip in zip(bufs, valids, flips):
      scores = resize_region(buf, valid, out_size, out_shape, flip, row0)
      if softmax:
        scores = jax.nn.softmax(scores, axis=-1)
      total = total + (1.0 / len(bufs)) * scores
  return jnp.argmax(total, axis=-1).astype(jnp.int32)


def pass_labels(passes: Sequence, out_size: tuple[int, int], settings: Settings) -> np.ndarray:
  """Label map int32 [H, W] = out_size of the passes [(buffer [Hb, Wb, C], (h, w) of
  the resized image in it, flip)]: the argmax of their scores resized to the
  original size (as `predict_scores`), computed a tile of rows at a time, so a large
  image never holds its [H, W, C] scores (docs/RELIABILITY.md)."""
  h, w = (int(v) for v in out_size)
  classes = passes[0][0].shape[-1] * (1 if len(passes) == 1 else 2)
  rows = tile_rows(h, w, classes, settings)
  out_shape = (rows, round_up((w,), settings.out_multiple)[0])
  bufs = tuple(p[0] for p in passes)
  valids = tuple(np.asarray(p[1], np.int32) for p in passes)
  flips = tuple(bool(p[2]) for p in passes)
  size = np.asarray((h, w), np.int32)
  labels = np.empty((h, w), np.int32)
  for row0 in range(0, h, rows):
    tile = _label_tile(bufs, valids, size, np.int32(row0), out_shape, flips, settings.tta_softmax)
    labels[row0 : row0 + rows] = np.asarray(tile)[: h - row0, :w]
  return labels


def segment(predict_fn: PredictFn, image, settings: Settings) -> np.ndarray:
  """Label map int32 [H, W]: the argmax of `predict_scores`, by `pass_labels`."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image: expected [H, W, 3] uint8, got shape {image.shape}")
  passes = []
  for ratio, flip in settings.augmentations:
    buf, size = resized_scores(predict_fn, image, settings, ratio, flip)
    passes.append((buf, size, flip))
  return pass_labels(passes, image.shape[:2], settings)
