"""Generator, class lists, raw readers and every kind of bad input."""

import filecmp
import glob
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import recipes
from mtaclip_jax.data import classes
from mtaclip_jax.data import generate
from mtaclip_jax.data import pipeline
from mtaclip_jax.data import readers

SIZE = (64, 96)
K = 6


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  base = tmp_path_factory.mktemp("data")
  generate.write_dataset("ade20k", str(base / "ade"), {"train": 6, "val": 2}, 0, SIZE, K)
  generate.write_dataset("cityscapes", str(base / "cs"), {"train": 6, "val": 3}, 0, SIZE, K)
  return base


def _config(root, name="ade20k", **kw):
  return recipes.data_config(name, str(root), **{"num_classes": K, **kw})


def _copy(datasets, tmp_path, name="ade"):
  shutil.copytree(datasets / name, tmp_path / name)
  return tmp_path / name


# ---------------------------------------------------------------- generator, classes


def test_generator_deterministic_and_real_layout(datasets, tmp_path):
  generate.main(
      [
          "--layout",
          "ade20k",
          "--out",
          str(tmp_path / "a"),
          "--train",
          "6",
          "--val",
          "2",
          "--seed",
          "0",
          "--size",
          "64x96",
          "--num-classes",
          str(K),
      ]
  )
  ade = "ADEChallengeData2016"
  files = sorted(glob.glob(str(tmp_path / "a" / ade / "*" / "*" / "*")))
  assert len(files) == 16
  for f in files:
    ref = str(f).replace(str(tmp_path / "a"), str(datasets / "ade"))
    assert filecmp.cmp(f, ref, shallow=False), f
  names = sorted(os.listdir(datasets / "ade" / ade / "images" / "training"))
  assert names[0] == "ADE_train_00000001.jpg" and len(names) == 6
  assert sorted(os.listdir(datasets / "ade" / ade / "annotations" / "validation")) == [
      "ADE_val_00000001.png",
      "ADE_val_00000002.png",
  ]
  lab = np.asarray(
      Image.open(datasets / "ade" / ade / "annotations" / "training" / "ADE_train_00000001.png")
  )
  assert lab.dtype == np.uint8 and lab.shape == SIZE and lab.max() <= K
  assert (lab == 0).any() and len(np.unique(lab)) >= 3  # ignore + several classes
  img = Image.open(datasets / "ade" / ade / "images" / "training" / "ADE_train_00000001.jpg")
  assert img.format == "JPEG" and img.mode == "RGB" and img.size == SIZE[::-1]
  generate.write_dataset("ade20k", str(tmp_path / "b"), {"train": 1}, 1, SIZE, K)
  other = tmp_path / "b" / ade / "annotations" / "training" / "ADE_train_00000001.png"
  assert not filecmp.cmp(
      other,
      datasets / "ade" / ade / "annotations" / "training" / "ADE_train_00000001.png",
      shallow=False,
  )


def test_generator_cityscapes_layout(datasets):
  from cityscapesscripts.helpers.labels import id2label

  imgs = sorted(glob.glob(str(datasets / "cs" / "leftImg8bit" / "train" / "*" / "*.png")))
  assert len(imgs) == 6
  assert {os.path.basename(os.path.dirname(p)) for p in imgs} == set(generate.CITIES["train"])
  assert os.path.basename(imgs[0]) == "aachen_000000_000019_leftImg8bit.png"
  values = set()
  for p in imgs:
    lab = p.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_labelIds")
    values |= set(np.unique(np.asarray(Image.open(lab))).tolist())
  train_ids = {id2label[v].trainId for v in values}
  assert 0 in values and len(values) > 3  # unlabeled (ignore) and classes
  assert train_ids - {255} <= set(range(K))


def test_class_names_and_palettes():
  cfg = _config("/x")
  assert classes.class_names(cfg) == ["wall", "building", "sky", "floor", "tree", "ceiling"]
  assert len(classes.palette(cfg)) == K
  full = recipes.data_config("ade20k", "/x")
  names = classes.class_names(full)
  assert len(names) == 150 and names[-1] == "flag" and names[7] == "bed"
  cs = recipes.data_config("cityscapes", "/x")
  assert classes.class_names(cs)[:3] == ["road", "sidewalk", "building"]
  assert classes.class_names(cs)[-1] == "bicycle" and len(classes.palette(cs)) == 19
  with pytest.raises(ValueError, match="num_classes=20"):
    classes.class_names(recipes.data_config("cityscapes", "/x", num_classes=20))


# ---------------------------------------------------------------- readers


def test_ade_labels_mapped_and_root_forms(datasets):
  root = datasets / "ade"
  for r in (root, root / "ADEChallengeData2016"):
    src = readers.RawSource("ade20k", str(r), "train", K)
    assert len(src) == 6
  ex = src[0]
  raw = np.asarray(Image.open(src.samples[0].label_path))
  np.testing.assert_array_equal(ex["label"], np.where(raw == 0, 255, raw.astype(int) - 1))
  assert ex["image"].shape == SIZE + (3,) and ex["name"] == "ADE_train_00000001"


def test_cityscapes_labels_mapped_and_train_ids_preferred(datasets, tmp_path):
  from cityscapesscripts.helpers.labels import id2label

  root = _copy(datasets, tmp_path, "cs")
  src = readers.RawSource("cityscapes", str(root), "val", K)
  s = src.samples[0]
  assert s.label_path.endswith("_gtFine_labelIds.png") and "frankfurt" in s.name
  raw = np.asarray(Image.open(s.label_path))
  ref = np.vectorize(lambda v: id2label[v].trainId if 0 <= id2label[v].trainId < 19 else 255)(raw)
  np.testing.assert_array_equal(src[0]["label"], ref)
  # a labelTrainIds file next to it is used instead
  train_ids = np.full(SIZE, 255, np.uint8)
  train_ids[:10] = 2
  Image.fromarray(train_ids).save(s.label_path.replace("labelIds", "labelTrainIds"))
  src = readers.RawSource("cityscapes", str(root), "val", K)
  np.testing.assert_array_equal(src[0]["label"], train_ids)


@pytest.mark.parametrize(
    "root,match", [("", "root is empty"), ("/nonexistent/x", "is not a ade20k dataset")]
)
def test_wrong_root(root, match):
  with pytest.raises(FileNotFoundError, match=match):
    readers.RawSource("ade20k", root, "train", K)


def test_empty_root(tmp_path):
  for d in ("images/training", "annotations/training"):
    os.makedirs(tmp_path / "ADEChallengeData2016" / d)
  with pytest.raises(FileNotFoundError, match="no images in .*training: expected"):
    readers.RawSource("ade20k", str(tmp_path), "train", K)


def _ade_paths(root, i=1):
  base = root / "ADEChallengeData2016"
  return (
      base / "images" / "training" / f"ADE_train_{i:08d}.jpg",
      base / "annotations" / "training" / f"ADE_train_{i:08d}.png",
  )


def _corrupt(kind, img, lab):
  """Damages sample files in place; returns (path named in the error, message regex)."""
  if kind == "corrupt_image":
    img.write_bytes(b"not a jpeg at all" * 10)
    return img, "cannot decode image"
  if kind == "truncated_image":
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    return img, "cannot decode image"
  if kind == "zero_byte":
    img.write_bytes(b"")
    return img, "empty file"
  if kind == "label_missing":
    lab.unlink()
    return lab, "label missing"
  if kind == "label_size":
    Image.fromarray(np.ones((SIZE[0] - 1, SIZE[1]), np.uint8)).save(lab)
    return lab, "label size 96x63 .* differs from its image"
  if kind == "label_range":
    a = np.asarray(Image.open(lab)).copy()
    a[0, 0] = K + 3
    Image.fromarray(a).save(lab)
    return lab, f"label values \\[{K + 3}\\] outside the class range"
  if kind == "label_rgb":
    Image.open(lab).convert("RGB").save(lab)
    return lab, "label mode 'RGB', expected a single-channel"
  if kind == "label_16bit_big":
    a = np.asarray(Image.open(lab)).astype(np.uint16) * 300
    Image.fromarray(a).save(lab)
    return lab, "16-bit label with values"
  raise ValueError(kind)


BAD = [
    "corrupt_image",
    "truncated_image",
    "zero_byte",
    "label_missing",
    "label_size",
    "label_range",
    "label_rgb",
    "label_16bit_big",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_sample_error_and_skip(datasets, tmp_path, kind, caplog):
  root = _copy(datasets, tmp_path)
  img, lab = _ade_paths(root, 2)
  path, match = _corrupt(kind, img, lab)
  src = readers.RawSource("ade20k", str(root), "train", K)
  with pytest.raises(errors.BadSampleError, match=match) as e:
    src[1]
  assert str(path) in str(e.value)
  caplog.set_level(logging.WARNING)
  src = readers.RawSource("ade20k", str(root), "train", K, on_bad_sample="skip")
  assert src[1]["name"] == "ADE_train_00000003"  # replaced by the next one
  assert str(path) in caplog.text
  ev = pipeline.make_eval_dataset(_config(root, on_bad_sample="skip"), "train")
  assert len(ev) == 5 and "ADE_train_00000002" not in [ev[i]["name"] for i in range(5)]


def test_label_16bit_that_fits_and_palette_label(datasets, tmp_path):
  root = _copy(datasets, tmp_path)
  ref = readers.RawSource("ade20k", str(root), "train", K)[0]["label"]
  _, lab = _ade_paths(root, 1)
  a = np.asarray(Image.open(lab))
  Image.fromarray(a.astype(np.uint16)).save(lab)
  assert Image.open(lab).mode.startswith("I")
  np.testing.assert_array_equal(readers.RawSource("ade20k", str(root), "train", K)[0]["label"], ref)
  p = Image.fromarray(a, mode="L").convert("P")
  p.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
  p.save(lab)
  assert Image.open(lab).mode == "P"
  np.testing.assert_array_equal(readers.RawSource("ade20k", str(root), "train", K)[0]["label"], ref)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_palette_images_converted_with_warning(datasets, tmp_path, mode, caplog):
  root = _copy(datasets, tmp_path)
  img, _ = _ade_paths(root, 1)
  rgb = Image.open(img).convert("RGB")
  png = img.with_suffix(".png")
  rgb.convert(mode).save(png)
  os.replace(png, img)  # content PNG, name .jpg: PIL reads by content
  readers._warned.discard(("image_mode", mode))
  caplog.set_level(logging.WARNING)
  ex = readers.RawSource("ade20k", str(root), "train", K)[0]
  assert ex["image"].shape == SIZE + (3,) and ex["image"].dtype == np.uint8
  assert f"image mode '{mode}', converting to RGB" in caplog.text
  expected = np.asarray(rgb.convert(mode).convert("RGB"))
  np.testing.assert_array_equal(ex["image"], expected)
  caplog.clear()
  readers.RawSource("ade20k", str(root), "train", K)[0]
  assert "converting" not in caplog.text  # once


def test_labels_beyond_num_classes_error(datasets):
  cfg = _config(datasets / "ade", num_classes=2)
  with pytest.raises(errors.BadSampleError, match="ADE_train_.*data.num_classes=2"):
    ev = pipeline.make_eval_dataset(cfg, "train")
    for i in range(len(ev)):
      ev[i]


def test_check_cli(datasets, tmp_path):
  root = _copy(datasets, tmp_path)
  img, lab = _ade_paths(root, 3)
  _corrupt("label_range", img, lab)
  _ade_paths(root, 4)[0].write_bytes(b"")
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import ml_collections\nfrom mtaclip_jax.config import recipes\n"
      "def get_config():\n  c = ml_collections.ConfigDict()\n"
      f"  c.data = recipes.data_config('ade20k', '/nonexistent', num_classes={K})\n"
      "  return c\n"
  )
  cmd = [sys.executable, "-m", "mtaclip_jax.data.check", f"--config={cfg}"]
  out = subprocess.run(
      cmd + [f"--config.data.root={root}"], capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 1, out.stderr
  assert "[train] 6 samples, 2 bad, image HxW [64, 96] .. [64, 96]" in out.stdout
  assert "[val] 2 samples, 0 bad" in out.stdout
  assert f"BAD {_ade_paths(root, 3)[0]}: {_ade_paths(root, 3)[1]}: label values" in out.stdout
  assert "empty file" in out.stdout and " wall " in out.stdout
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "is not a ade20k dataset" in out.stderr
