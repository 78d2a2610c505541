"""The one image decoder: dataset images, evaluation and the photos `predict` segments.

Every file becomes uint8 [H, W, 3] RGB by the same rules (docs/DATA.md, "Image
decoding"):

- 8-bit RGB as stored; greyscale, bilevel, palette, CMYK and YCbCr converted to RGB
  by PIL (no colour management: an embedded ICC profile is not applied);
- 16-bit samples scaled to 8 bits by keeping the high byte (v >> 8, as OpenCV's
  `imread(IMREAD_COLOR)` and PIL's own 16-bit RGB reading do), so a 16-bit file
  holding 257 * v decodes to exactly v;
- alpha dropped: the colour channels are kept as stored, not blended onto a
  background (a palette's transparent entry keeps its palette colour);
- multi-frame files (animated GIF, WebP, multi-page TIFF): the first frame;
- the EXIF orientation tag applied when asked (`orient=True`, the photos `predict`
  reads) so the pixels are the image as viewers display it; dataset images are read
  as stored (`orient=False`) because their labels are drawn on the stored pixels;
- more than `MAX_PIXELS` pixels declared in the header: an error before anything
  is decoded, whatever the file's size on disk.

Anything else that cannot be decoded raises `errors.ImageReadError` naming the file
and the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import numpy as np
from PIL import Image

from mtaclip_jax import errors

# 128 Mi pixels (e.g. 16384 x 8192): 384 MiB once decoded to RGB. PIL's own guard
# (Image.MAX_IMAGE_PIXELS, which only warns up to twice its 89.5 M) is overridden by
# this one, checked from the header before the pixels are read.
MAX_PIXELS = 1 << 27

EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclasses.dataclass(frozen=True)
class Decoded:
  """pixels: uint8 [H, W, 3] RGB; mode: the file's PIL mode; orientation: its EXIF
  orientation tag (1 = none or as stored); oriented: whether it was applied;
  frames: number of frames in the file (the first is read)."""

  pixels: np.ndarray
  mode: str
  orientation: int
  oriented: bool
  frames: int


def _check_file(path: str) -> None:
  if os.path.isdir(path):
    raise errors.ImageReadError(f"{path}: is a directory, expected an image file")
  if not os.path.exists(path):
    if os.path.islink(path):
      target = os.readlink(path)
      raise errors.ImageReadError(f"{path}: image missing (broken symbolic link to {target!r})")
    raise errors.ImageReadError(f"{path}: image missing (no such file)")
  if os.path.getsize(path) == 0:
    raise errors.ImageReadError(f"{path}: empty file (0 bytes), expected an image")


def _too_large(path: str, detail: str) -> errors.ImageReadError:
  return errors.ImageReadError(
      f"{path}: image too large: {detail}, more than the limit of {MAX_PIXELS} pixels "
      "(image_decode.MAX_PIXELS)"
  )


def _open(path: str):
  try:
    with warnings.catch_warnings():
      # The size is checked against MAX_PIXELS below, with a clearer message. From
      # reader threads catch_warnings may leave this filter set after the call:
      # harmless, the check below still applies.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      return Image.open(path)
  except Image.DecompressionBombError as e:
    # Past twice Image.MAX_IMAGE_PIXELS PIL refuses it in `open`, before the check
    # below; its message gives the pixel count, not the size.
    count = re.search(r"\((\d+) pixels\)", str(e))
    raise _too_large(path, f"declares {count[1] if count else 'too many'} pixels") from e
  except PermissionError as e:
    raise errors.ImageReadError(f"{path}: cannot open image (PermissionError: {e})") from e
  except Exception as e:  # pylint: disable=broad-except
    raise errors.ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _orientation(im) -> int:
  try:
    value = int(im.getexif().get(EXIF_ORIENTATION, 1))
  except Exception:  # pylint: disable=broad-except
    return 1  # unreadable EXIF: the pixels as stored
  return value if 1 <= value <= 8 else 1


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
  """The stored pixels [H, W, ...] as displayed under EXIF `orientation` (1-8), as
  PIL's `ImageOps.exif_transpose`."""
  ops = {
      1: lambda a: a,
      2: lambda a: a[:, ::-1],
      3: lambda a: a[::-1, ::-1],
      4: lambda a: a[::-1],
      5: lambda a: a.swapaxes(0, 1),
      6: lambda a: np.rot90(a, -1),
      7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
      8: lambda a: np.rot90(a, 1),
  }
  if orientation not in ops:
    raise ValueError(f"EXIF orientation {orientation}: expected 1..8")
  return np.ascontiguousarray(ops[orientation](pixels))


def _to_rgb(im, path: str) -> np.ndarray:
  mode = im.mode
  if mode == "RGB":
    return np.asarray(im)
  if mode in _SIXTEEN_BIT or mode == "I":
    grey = np.asarray(im)
    if mode == "I" and grey.size and (grey.min() < 0 or grey.max() > 0xFFFF):
      raise errors.ImageReadError(
          f"{path}: 32-bit integer image with values {grey.min()}..{grey.max()}, "
          "expected 8- or 16-bit samples"
      )
    grey = (grey.astype(np.uint16) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == "F":
    raise errors.ImageReadError(
        f"{path}: floating-point image (PIL mode 'F'), expected 8- or 16-bit samples"
    )
  if mode in _ALPHA or (mode == "P" and "transparency" in im.info):
    return np.asarray(im.convert("RGBA"))[..., :3]
  return np.asarray(im.convert("RGB"))


def header_size(path: str) -> tuple[int, int]:
  """(width, height) that the header of `path` declares, no pixel decoded. Raises
  `errors.ImageReadError` as `decode` does for a file it would refuse before decoding
  (missing, empty, a folder, not an image, more than `MAX_PIXELS` pixels)."""
  _check_file(path)
  with _open(path) as im:
    w, h = im.size
  if w * h > MAX_PIXELS:
    raise _too_large(path, f"declares {w}x{h} (WxH) = {w * h} pixels")
  return w, h


def decode(path: str, apply_orientation: bool) -> Decoded:
  """Decodes the first frame of `path` to RGB; `apply_orientation` applies its EXIF
  orientation. Raises `errors.ImageReadError` naming the file."""
  _check_file(path)
  im = _open(path)
  with im:
    w, h = im.size
    if w * h > MAX_PIXELS:
      raise _too_large(path, f"declares {w}x{h} (WxH) = {w * h} pixels")
    if w < 1 or h < 1:
      raise errors.ImageReadError(f"{path}: declares an empty image ({w}x{h} WxH)")
    try:
      frames = int(getattr(im, "n_frames", 1))
      im.load()
      orientation = _orientation(im)
      pixels = _to_rgb(im, path)
    except errors.ImageReadError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise errors.ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    mode = im.mode
  oriented = apply_orientation and orientation != 1
  if oriented:
    pixels = orient(pixels, orientation)
  return Decoded(np.ascontiguousarray(pixels, np.uint8), mode, orientation, oriented, frames)


def read_rgb(path: str, apply_orientation: bool = True) -> np.ndarray:
  """uint8 [H, W, 3] of `path` as displayed (`apply_orientation`) or as stored."""
  return decode(path, apply_orientation).pixels
