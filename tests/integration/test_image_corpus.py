"""`predict` over a folder of the files users meet, made at test time from one
validation image: EXIF orientations, 16-bit, grey, palette, CMYK, alpha, animated
GIF, WebP, BMP, multi-page TIFF, tiny and large sizes, and broken files.

Each decodable file's label has the size the image is displayed at and equals the
label of its plain 8-bit RGB twin (the same picture as an RGB PNG, in the same
folder, so one predict call covers both); each broken file gets exactly one error
line naming it, and the run goes on. Whole mode runs with a pixel-wise stub model
(cheap); the tiny trained checkpoint runs once over the whole corpus (slide mode,
one compile) and as the CLI, with --fail-fast and without.
"""

import builtins
import io
import os
import shutil
import struct
import zlib

import cv2
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from mtaclip_jax.data import image_decode
from mtaclip_jax.evaluation import inference
from mtaclip_jax.serve import predict
from tests import cli_process
from tests import train_fixtures

NUM_CLASSES = 4
_W = np.random.RandomState(0).randn(3, NUM_CLASSES).astype(np.float32)


def stub_fn(x):
  """Pixel-wise scores of normalised images [B, H, W, 3]: a deterministic model."""
  return np.tanh(np.asarray(x) @ _W)


def _exif(orientation):
  exif = Image.Exif()
  exif[image_decode.EXIF_ORIENTATION] = orientation
  return exif.tobytes()


def _png_header(width, height):
  """A PNG whose header declares width x height, with ten bytes of pixel data."""

  def chunk(kind, data):
    crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return struct.pack(">I", len(data)) + kind + data + crc

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))


def build_corpus(folder, base):
  """Writes the corpus; returns (decodable: name -> (displayed (h, w), twin name or
  None), broken: name -> expected reason)."""
  folder.mkdir()
  rgb = Image.fromarray(base)
  h, w = base.shape[:2]
  grey = rgb.convert("L")

  def save(name, im, **kw):
    im.save(folder / name, **kw)

  def twin_of(name, pixels):  # the picture as a plain 8-bit RGB PNG
    save(name, Image.fromarray(np.asarray(pixels, np.uint8)).convert("RGB"))

  save("rgb.png", rgb)
  twin_of("grey_twin.png", np.asarray(grey))
  save("grey.png", grey)
  save("grey16.png", Image.fromarray(np.asarray(grey).astype(np.uint16) * 257))
  grey_alpha = grey.convert("LA")
  grey_alpha.putalpha(Image.fromarray(base[..., 1]))
  save("grey_alpha.png", grey_alpha)
  cv2.imwrite(str(folder / "rgb16.png"), base[..., ::-1].astype(np.uint16) * 257)
  rgba = rgb.copy()
  rgba.putalpha(Image.fromarray(255 - base[..., 0]))
  save("rgba.png", rgba)
  palette = rgb.quantize(16)
  save("palette.png", palette)
  twin_of("palette_twin.png", palette.convert("RGB"))
  frames = [rgb.quantize(32), Image.fromarray(255 - base).quantize(32)]
  save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
  with Image.open(folder / "animated.gif") as gif:
    twin_of("animated_twin.png", gif.convert("RGB"))
  save("pages.tif", rgb, save_all=True, append_images=[Image.fromarray(255 - base)])
  save("photo.webp", rgb, lossless=True)
  save("rgb.bmp", rgb)
  save("cmyk.jpg", rgb.convert("CMYK"), quality=95)
  with Image.open(folder / "cmyk.jpg") as cmyk:
    assert cmyk.mode == "CMYK"
    twin_of("cmyk_twin.png", cmyk.convert("RGB"))
  decodable = {
      "rgb.png": ((h, w), None),
      "grey.png": ((h, w), "grey_twin.png"),
      "grey16.png": ((h, w), "grey_twin.png"),
      "grey_alpha.png": ((h, w), "grey_twin.png"),
      "rgb16.png": ((h, w), "rgb.png"),
      "rgba.png": ((h, w), "rgb.png"),
      "palette.png": ((h, w), "palette_twin.png"),
      "animated.gif": ((h, w), "animated_twin.png"),
      "pages.tif": ((h, w), "rgb.png"),
      "photo.webp": ((h, w), "rgb.png"),
      "rgb.bmp": ((h, w), "rgb.png"),
      "cmyk.jpg": ((h, w), "cmyk_twin.png"),
  }
  for o in (3, 6, 8):  # as phones write them: stored pixels + the tag
    save(f"exif{o}.jpg", rgb, quality=95, exif=_exif(o))
    with Image.open(folder / f"exif{o}.jpg") as im:
      shown = ImageOps.exif_transpose(im)
    twin_of(f"exif{o}_twin.png", shown)
    decodable[f"exif{o}.jpg"] = (((w, h) if o in (6, 8) else (h, w)), f"exif{o}_twin.png")
  for name, size in [("one.png", (1, 1)), ("row.png", (1, 600)), ("column.png", (600, 1))]:
    save(name, rgb.resize(size[::-1]))
    decodable[name] = (size, None)
  save("large.jpg", rgb.resize((1900, 2500)), quality=80)
  decodable["large.jpg"] = ((2500, 1900), None)
  for twin in {t for _, t in decodable.values() if t}:
    decodable.setdefault(twin, (np.asarray(Image.open(folder / twin)).shape[:2], None))

  (folder / "text.jpg").write_text("this is not an image\n")
  (folder / "empty.png").write_bytes(b"")
  buf = io.BytesIO()
  rgb.save(buf, "PNG")
  (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  (folder / "folder.jpg").mkdir()
  os.symlink(folder / "gone.png", folder / "dangling.png")
  (folder / "bomb.png").write_bytes(_png_header(200_000, 100_000))
  save("locked.png", rgb)
  os.chmod(folder / "locked.png", 0)
  broken = {
      "text.jpg": "cannot decode image (UnidentifiedImageError",
      "empty.png": "empty file (0 bytes)",
      "truncated.png": "cannot decode image (OSError: image file is truncated",
      "folder.jpg": "is a directory",
      "dangling.png": "image missing (broken symbolic link",
      "bomb.png": "image too large: declares 20000000000 pixels",
      "locked.png": "cannot open image (PermissionError",
  }
  return decodable, broken


@pytest.fixture(scope="module")
def trained():
  return train_fixtures.trained_tiny()


@pytest.fixture(scope="module")
def corpus(trained, tmp_path_factory):
  base = np.asarray(Image.open(trained[2][0]).convert("RGB"))
  folder = tmp_path_factory.mktemp("corpus") / "images"
  decodable, broken = build_corpus(folder, base)
  return folder, decodable, broken


@pytest.fixture
def locked_for_root(corpus, monkeypatch):
  """Root reads a mode-000 file anyway: refuse it as the kernel does for others."""
  path = str(corpus[0] / "locked.png")
  if os.geteuid() == 0:
    real_open = builtins.open

    def refusing_open(file, *args, **kw):
      if str(file) == path:
        raise PermissionError(13, "Permission denied", path)
      return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", refusing_open)


def _check(folder, out, failures, decodable, broken):
  for name, reason in broken.items():
    mine = [f for f in failures if f.startswith(f"{folder / name}: ")]
    assert len(mine) == 1 and reason in mine[0], (name, failures)
  assert len(failures) == len(broken), failures
  labels = {}
  for name, (size, _) in decodable.items():
    with Image.open(out / f"{os.path.splitext(name)[0]}_label.png") as im:
      labels[name] = np.asarray(im)
    assert labels[name].shape == size, name
  for name, (_, twin) in decodable.items():
    if twin:
      np.testing.assert_array_equal(labels[name], labels[twin], err_msg=name)
  assert len(os.listdir(out)) == 3 * len(decodable)  # nothing for the broken ones
  return labels


@pytest.mark.usefixtures("locked_for_root")
def test_corpus_whole_mode(corpus, tmp_path, capsys):
  folder, decodable, broken = corpus
  settings = inference.Settings(mode="whole", test_scale=(80, 64))
  paths = sorted(str(folder / f) for f in os.listdir(folder))
  names = [f"c{i}" for i in range(NUM_CLASSES)]
  palette = [(60 * i, 255 - 60 * i, 30) for i in range(NUM_CLASSES)]
  failures = predict.predict_images(
      stub_fn, settings, paths, str(tmp_path), names, palette, progress=False, batch=4
  )
  _check(folder, tmp_path, failures, decodable, broken)
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert sorted(errors) == sorted(f"error: {f}" for f in failures)


@pytest.mark.usefixtures("locked_for_root")
def test_corpus_with_the_trained_checkpoint(trained, corpus, tmp_path):
  config, workdir, _ = trained
  folder, decodable, broken = corpus
  failures = predict.run(
      config, workdir, [str(folder)], str(tmp_path), mode="slide", batch=1, progress=False
  )
  labels = _check(folder, tmp_path, failures, decodable, broken)
  assert max(int(v.max()) for v in labels.values()) < config.model.num_classes


def test_inference_and_write_failures_are_per_image(corpus, tmp_path):
  folder, _, _ = corpus
  settings = inference.Settings(mode="whole", test_scale=(80, 64))
  names, palette = ["a", "b", "c", "d"], [(0, 0, 0)] * 4
  paths = [str(folder / n) for n in ("rgb.png", "one.png", "grey.png", "row.png")]
  (tmp_path / "grey.json").mkdir()  # grey's JSON cannot be written (after its PNGs)

  def flaky(x):  # fails on the 1x1 image's input (resized to 64x64, padded)
    if np.asarray(x).shape[1:3] == (64, 64):
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nallocating 1 GiB")
    return stub_fn(x)

  failures = predict.predict_images(
      flaky, settings, paths, str(tmp_path), names, palette, progress=False, batch=4
  )
  # rgb and grey share a batch (same input shape), flushed first at the end.
  assert failures == [
      f"{paths[2]}: cannot write its outputs: [Errno 21] Is a directory: "
      f"'{tmp_path / 'grey.json'}'",
      f"{paths[1]}: inference failed (1x1 WxH): RuntimeError: RESOURCE_EXHAUSTED: out of "
      "memory allocating 1 GiB",
  ]
  written = {f for f in os.listdir(tmp_path) if not (tmp_path / f).is_dir()}
  assert written == {
      f"{n}{e}" for n in ("rgb", "row") for e in ("_label.png", "_overlay.png", ".json")
  }


def test_fail_fast_writes_what_was_read_before_and_stops(corpus, tmp_path, capsys):
  folder, _, _ = corpus
  settings = inference.Settings(mode="whole", test_scale=(80, 64))
  paths = [str(folder / n) for n in ("rgb.png", "text.jpg", "grey.png")]
  failures = predict.predict_images(
      stub_fn,
      settings,
      paths,
      str(tmp_path),
      ["a"] * 4,
      [(0, 0, 0)] * 4,
      progress=False,
      fail_fast=True,
  )
  assert len(failures) == 1 and failures[0].startswith(f"{paths[1]}: cannot decode image")
  assert sorted(os.listdir(tmp_path)) == ["rgb.json", "rgb_label.png", "rgb_overlay.png"]
  assert "stopped at the first failure (--fail-fast): 1 image(s) not processed" in (
      capsys.readouterr().err
  )


def _predict_cli(trained, images, out, *flags):
  config, workdir, _ = trained
  tiny = os.path.join(train_fixtures.ROOT, "tests", "configs", "tiny.py")
  proc = cli_process.run(
      "mtaclip_jax.predict",
      *[
          f"--config={tiny}:{config.data.root}",
          f"--workdir={workdir}",
          f"--out={out}",
          "--mode=slide",
          "--batch=1",
          "--images",
          *images,
          *flags,
      ],
  )
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  return proc, errors


def test_cli_fail_fast_exit_code_and_one_error_line(trained, corpus, tmp_path):
  folder, _, _ = corpus
  images = [str(folder / n) for n in ("rgb.png", "truncated.png", "grey.png")]
  proc, errors = _predict_cli(trained, images, tmp_path, "--fail-fast")
  assert proc.returncode == 1, proc.stderr
  assert len(errors) == 1, proc.stderr
  assert errors[0].startswith(f"error: {images[1]}: cannot decode image"), proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["rgb.json", "rgb_label.png", "rgb_overlay.png"]
  assert "stopped at the first failure (--fail-fast): 1 image(s) not processed" in proc.stderr
  assert "1 image(s) failed (the error lines above)" in proc.stderr


def test_cli_without_fail_fast_writes_the_others_and_exits_1(trained, corpus, tmp_path):
  folder, _, _ = corpus
  photos = tmp_path / "photos"  # a folder with one broken image
  photos.mkdir()
  for name in ("rgb.png", "truncated.png", "grey.png"):
    shutil.copy(folder / name, photos / name)
  out = tmp_path / "out"
  proc, errors = _predict_cli(trained, [str(photos)], out)
  assert proc.returncode == 1, proc.stderr
  assert len(errors) == 1, proc.stderr
  assert errors[0].startswith(
      f"error: {photos / 'truncated.png'}: cannot decode image"
  ), proc.stderr
  outputs = [f"{n}{e}" for n in ("grey", "rgb") for e in (".json", "_label.png", "_overlay.png")]
  assert sorted(os.listdir(out)) == outputs
  assert "--fail-fast" not in proc.stderr and "Traceback" not in proc.stderr
  assert "1 image(s) failed (the error lines above)" in proc.stderr
