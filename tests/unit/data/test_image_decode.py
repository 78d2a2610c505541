"""The one image decoder (data/image_decode.py): modes, 16-bit, alpha, frames, EXIF
orientation, and the files it refuses, each with one error naming the file."""

import builtins
import io
import logging
import os
import shutil
import struct
import warnings
import zlib

import cv2
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from mtaclip_jax import errors
from mtaclip_jax.data import image_decode
from mtaclip_jax.data import readers
from tests import train_fixtures

RGB = np.random.default_rng(0).integers(0, 256, (6, 10, 3), np.uint8)


def _save(path, im, **kw):
  im.save(path, **kw)
  return str(path)


def _exif(orientation):
  exif = Image.Exif()
  exif[image_decode.EXIF_ORIENTATION] = orientation
  return exif.tobytes()


def png_header(width, height):
  """A PNG whose header declares width x height (8-bit RGB) with ten bytes of data."""

  def chunk(kind, data):
    crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return struct.pack(">I", len(data)) + kind + data + crc

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (
      b"\x89PNG\r\n\x1a\n"
      + chunk(b"IHDR", ihdr)
      + chunk(b"IDAT", zlib.compress(b"\0" * 10))
      + chunk(b"IEND", b"")
  )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pil_exif_transpose(tmp_path, orientation):
  path = _save(tmp_path / "o.png", Image.fromarray(RGB), exif=_exif(orientation))
  shown = image_decode.decode(path, apply_orientation=True)
  with Image.open(path) as im:
    want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  np.testing.assert_array_equal(shown.pixels, want)
  assert shown.orientation == orientation and shown.oriented == (orientation != 1)
  stored = image_decode.decode(path, apply_orientation=False)
  np.testing.assert_array_equal(stored.pixels, RGB)
  assert not stored.oriented


def test_sixteen_bit_keeps_the_high_byte(tmp_path):
  grey = RGB[..., 0]
  path = _save(tmp_path / "g16.png", Image.fromarray(grey.astype(np.uint16) * 257))
  assert Image.open(path).mode == "I;16"
  np.testing.assert_array_equal(image_decode.read_rgb(path), np.repeat(grey[..., None], 3, -1))
  # A dark 16-bit image stays dark (v >> 8, as OpenCV), whatever its maximum.
  dark = _save(tmp_path / "dark.png", Image.fromarray(np.full((3, 4), 255, np.uint16)))
  assert image_decode.read_rgb(dark).max() == 0
  tiff = _save(tmp_path / "g16.tif", Image.fromarray(grey.astype(np.uint16) * 257))
  np.testing.assert_array_equal(image_decode.read_rgb(tiff)[..., 0], grey)
  rgb16 = str(tmp_path / "rgb16.png")
  cv2.imwrite(rgb16, RGB[..., ::-1].astype(np.uint16) * 257)
  np.testing.assert_array_equal(image_decode.read_rgb(rgb16), RGB)
  ok = Image.fromarray(grey.astype(np.int32) * 257, mode="I")
  np.testing.assert_array_equal(image_decode.read_rgb(_save(tmp_path / "i.tif", ok))[..., 0], grey)


@pytest.mark.parametrize(
    "mode,value,match",
    [("I", 1 << 20, "32-bit integer image with values"), ("F", 0.5, "floating-point image")],
)
def test_unsupported_sample_types_are_named(tmp_path, mode, value, match):
  path = _save(tmp_path / "x.tif", Image.new(mode, (4, 3), value))
  with pytest.raises(errors.ImageReadError, match=f"{path}: {match}"):
    image_decode.read_rgb(path)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA", "RGBA", "PA"])
def test_colour_modes_to_rgb_alpha_dropped(tmp_path, mode):
  im = Image.fromarray(RGB).convert(mode if mode != "PA" else "P")
  if mode == "PA":
    im = im.convert("PA")
  if mode in ("LA", "RGBA", "PA"):
    im.putalpha(Image.fromarray(RGB[..., 0]))  # alpha varies; colours must not
  ext = "tif" if mode in ("CMYK", "PA") else "png"
  path = _save(tmp_path / f"m.{ext}", im)
  decoded = image_decode.decode(path, True)
  assert decoded.mode == mode
  colour = im.convert("RGBA") if mode in ("LA", "RGBA", "PA") else im
  np.testing.assert_array_equal(decoded.pixels, np.asarray(colour.convert("RGB"))[..., :3])


def test_palette_transparency_keeps_the_palette_colour(tmp_path):
  im = Image.fromarray(RGB).convert("P")
  im.info["transparency"] = 0
  path = _save(tmp_path / "t.png", im, transparency=0)
  assert "transparency" in Image.open(path).info
  np.testing.assert_array_equal(image_decode.read_rgb(path), np.asarray(im.convert("RGB")))


def test_multi_frame_files_give_the_first_frame(tmp_path):
  frames = [Image.fromarray(np.full((6, 10, 3), v, np.uint8)) for v in (40, 200, 90)]
  gif = _save(tmp_path / "a.gif", frames[0], save_all=True, append_images=frames[1:])
  tif = _save(tmp_path / "a.tif", frames[0], save_all=True, append_images=frames[1:])
  for path in (gif, tif):
    decoded = image_decode.decode(path, True)
    assert decoded.frames == 3
    np.testing.assert_array_equal(decoded.pixels, np.asarray(frames[0]))


def _broken(tmp_path, kind):
  """(path, expected message) of a file the decoder must refuse."""
  path = tmp_path / f"{kind}.png"
  if kind == "zero_byte":
    path.write_bytes(b"")
    return path, "empty file \\(0 bytes\\)"
  if kind == "text":
    path = tmp_path / "text.jpg"
    path.write_text("not an image\n")
    return path, "cannot decode image \\(UnidentifiedImageError"
  if kind == "truncated":
    buf = io.BytesIO()
    Image.fromarray(RGB).resize((60, 40)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path, "cannot decode image \\(OSError: image file is truncated"
  if kind == "directory":
    path = tmp_path / "x.jpg"
    path.mkdir()
    return path, "is a directory"
  if kind == "missing":
    return path, "image missing \\(no such file\\)"
  if kind == "broken_link":
    os.symlink(tmp_path / "nowhere.png", path)
    return path, "image missing \\(broken symbolic link to"
  if kind == "huge_header":  # past PIL's own refusal (twice its 89.5 M pixels)
    path.write_bytes(png_header(100_000, 100_000))
    return path, "image too large: declares 10000000000 pixels, more than the limit"
  if kind == "large_header":  # within PIL's limits, past MAX_PIXELS
    path.write_bytes(png_header(12_000, 12_000))
    return path, "image too large: declares 12000x12000 \\(WxH\\) = 144000000 pixels"
  raise ValueError(kind)


BROKEN = [
    "zero_byte",
    "text",
    "truncated",
    "directory",
    "missing",
    "broken_link",
    "huge_header",
    "large_header",
]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_files_one_error_naming_the_file(tmp_path, kind):
  path, match = _broken(tmp_path, kind)
  with pytest.raises(errors.ImageReadError, match=f"^{path}: {match}"):
    image_decode.read_rgb(str(path))


@pytest.mark.parametrize("kind", BROKEN)
def test_header_size_refuses_what_decoding_would_before_the_pixels(tmp_path, kind):
  """The training crop check reads sizes this way (config/validate.py): the same
  error, without PIL's DecompressionBombError or DecompressionBombWarning."""
  path, match = _broken(tmp_path, kind)
  if kind == "truncated":  # a whole header: the pixels fail when they are read
    assert image_decode.header_size(str(path)) == (60, 40)
    return
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(errors.ImageReadError, match=f"^{path}: {match}"):
      image_decode.header_size(str(path))


def test_unreadable_file_is_named(tmp_path, monkeypatch):
  path = _save(tmp_path / "locked.png", Image.fromarray(RGB))
  os.chmod(path, 0)
  if os.geteuid() == 0:  # root reads it anyway: refuse it as the kernel would
    real_open = builtins.open

    def refusing_open(file, *args, **kw):
      if str(file) == path:
        raise PermissionError(13, "Permission denied", path)
      return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", refusing_open)
  with pytest.raises(errors.ImageReadError, match=f"{path}: cannot open image \\(PermissionError"):
    image_decode.read_rgb(path)


def test_dataset_images_are_read_as_stored_with_a_warning(tmp_path, caplog):
  root = train_fixtures.make_dataset(tmp_path / "d", train=2, val=1)
  base = os.path.join(root, "images", "training")
  img = os.path.join(base, sorted(os.listdir(base))[0])
  stored = np.asarray(Image.open(img))
  _save(img, Image.fromarray(stored), format="JPEG", quality=100, exif=_exif(3))
  stored = np.asarray(Image.open(img).convert("RGB"))
  readers._warned.discard(("image_orientation",))
  caplog.set_level(logging.WARNING)
  source = readers.RawSource("ade20k", os.path.dirname(root), "train", 4)
  np.testing.assert_array_equal(source[0]["image"], stored)  # not rotated by 180
  assert "EXIF orientation 3 not applied" in caplog.text
  # A label drawn on the displayed (rotated) image: the size error says why.
  _save(img, Image.fromarray(np.ascontiguousarray(np.rot90(stored))), exif=_exif(6), format="JPEG")
  with pytest.raises(errors.BadSampleError, match="EXIF orientation 6 would give the label's size"):
    source[0]


def test_readers_and_predict_share_the_decoder(tmp_path):
  path = str(tmp_path / "g16.png")
  shutil.copy(
      _save(tmp_path / "src.png", Image.fromarray(RGB[..., 0].astype(np.uint16) * 257)), path
  )
  np.testing.assert_array_equal(readers.read_image(path), image_decode.read_rgb(path))
  (tmp_path / "bad.png").write_bytes(b"")
  with pytest.raises(errors.BadSampleError, match="empty file"):
    readers.read_image(str(tmp_path / "bad.png"))
