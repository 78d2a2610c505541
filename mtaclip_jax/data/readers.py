"""Readers for the raw ADE20k, Cityscapes and folder (data/folder.py) layouts, with
checks of every file.

A sample is decoded into `{"image": uint8 [H, W, 3], "label": uint8 [H, W] (train
ids, 255 = ignore), "name": str}`. Anything wrong with a file raises
`errors.BadSampleError` naming the file and what was expected; callers decide (from
`data.on_bad_sample`) whether that stops the run or skips the sample.
"""

import dataclasses
import functools
import glob
import logging
import os

import numpy as np
from PIL import Image

from mtaclip_jax import errors
from mtaclip_jax.data import classes
from mtaclip_jax.data import folder
from mtaclip_jax.data import image_decode

IGNORE = classes.IGNORE_LABEL
log = logging.getLogger(__name__)
_warned = set()


def warn_once(key, message):
  if key not in _warned:
    _warned.add(key)
    log.warning(message)


@dataclasses.dataclass(frozen=True)
class Sample:
  image_path: str
  label_path: str
  name: str


# ---------------------------------------------------------------- layouts

ADE_SPLITS = {
    "train": "training",
    "training": "training",
    "val": "validation",
    "validation": "validation",
}
CITYSCAPES_SPLITS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "validation": "val",
    "test": "test",
}


def dataset_dir(name, root):
  """The folder holding the dataset: `root` itself or its standard subfolder."""
  if not root:
    raise FileNotFoundError(f"config.data.root is empty: expected the {name} folder")
  if name == folder.NAME:
    return folder.dataset_dir(root)
  root = os.path.expanduser(root)
  if name == "ade20k":
    marks, sub = ("images", "annotations"), "ADEChallengeData2016"
    expected = (
        "ADEChallengeData2016/{images,annotations}/{training,validation}/" " or that folder itself"
    )
  elif name == "cityscapes":
    marks, sub = ("leftImg8bit", "gtFine"), "cityscapes"
    expected = "{leftImg8bit,gtFine}/{train,val,test}/<city>/ (or cityscapes/...)"
  else:
    raise ValueError(f"config.data.name={name!r}: expected one of {list(classes.NAMES)}")
  for cand in (root, os.path.join(root, sub)):
    if all(os.path.isdir(os.path.join(cand, m)) for m in marks):
      return cand
  raise FileNotFoundError(f"config.data.root={root!r} is not a {name} dataset: expected {expected}")


def split_table(name):
  """{split name a config may use: folder name on disk} of dataset `name`."""
  if name == folder.NAME:
    return folder.SPLITS
  return ADE_SPLITS if name == "ade20k" else CITYSCAPES_SPLITS


def split_dir_name(name, split):
  table = split_table(name)
  if split not in table:
    raise ValueError(f"split {split!r} of {name}: expected one of {sorted(table)}")
  return table[split]


def list_samples(name, root, split):
  """Sorted samples of one split; a missing label is reported when it is read (a
  folder dataset's unpaired stems when the split is listed)."""
  if name == folder.NAME:
    return [Sample(i, m, s) for i, m, s in folder.list_pairs(root, split)]
  base = dataset_dir(name, root)
  sdir = split_dir_name(name, split)
  samples = []
  if name == "ade20k":
    img_dir = os.path.join(base, "images", sdir)
    for path in sorted(glob.glob(os.path.join(img_dir, "*.jpg"))):
      stem = os.path.splitext(os.path.basename(path))[0]
      samples.append(Sample(path, os.path.join(base, "annotations", sdir, stem + ".png"), stem))
  else:
    img_dir = os.path.join(base, "leftImg8bit", sdir)
    suffix = "_leftImg8bit.png"
    for path in sorted(glob.glob(os.path.join(img_dir, "*", "*" + suffix))):
      city = os.path.basename(os.path.dirname(path))
      stem = os.path.basename(path)[: -len(suffix)]
      gt = os.path.join(base, "gtFine", sdir, city, stem + "_gtFine_")
      train_ids = gt + "labelTrainIds.png"
      label = train_ids if os.path.exists(train_ids) else gt + "labelIds.png"
      samples.append(Sample(path, label, stem))
  if not samples:
    pattern = "*.jpg" if name == "ade20k" else "<city>/*_leftImg8bit.png"
    raise FileNotFoundError(f"no images in {img_dir}: expected {pattern}")
  return samples


# ---------------------------------------------------------------- label tables


@functools.lru_cache(maxsize=None)
def label_table(name, kind, num_classes):
  """uint8 LUT raw value -> train id (255 ignore); -1 marks values that are errors."""
  lut = np.full(256, -1, np.int32)
  if name == "ade20k":
    lut[0] = IGNORE
    lut[1 : num_classes + 1] = np.arange(num_classes)
  elif kind == "labelTrainIds":
    lut[IGNORE] = IGNORE
    lut[:num_classes] = np.arange(num_classes)
  else:
    from cityscapesscripts.helpers.labels import labels  # pylint: disable=g-import-not-at-top

    lut[IGNORE] = IGNORE  # license plate (id -1) as stored in uint8 PNGs
    for lab in labels:
      if lab.id < 0:
        continue
      if 0 <= lab.trainId < 19:
        lut[lab.id] = lab.trainId if lab.trainId < num_classes else -1
      else:
        lut[lab.id] = IGNORE
  return lut


def expected_values(name, kind, num_classes):
  if name == "ade20k":
    return f"0 (ignore) or 1..{num_classes} (data.num_classes={num_classes})"
  if kind == "labelTrainIds":
    return f"train ids 0..{num_classes - 1} or 255 (data.num_classes={num_classes})"
  return f"Cityscapes labelIds 0..33 whose train id is < {num_classes} or ignored"


def label_kind(path):
  return "labelTrainIds" if path.endswith("_labelTrainIds.png") else "labelIds"


# ---------------------------------------------------------------- decoding


def _open(path, what):
  if not os.path.exists(path):
    raise errors.BadSampleError(f"{path}: {what} missing")
  if os.path.getsize(path) == 0:
    raise errors.BadSampleError(f"{path}: empty file (0 bytes), expected a {what}")
  try:
    im = Image.open(path)
    im.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise errors.BadSampleError(f"{path}: cannot decode {what} ({e})") from e
  return im


def read_image(path):
  """uint8 [H, W, 3] RGB by the rules of `image_decode` (greyscale / palette / CMYK /
  alpha / 16-bit converted, warned once per mode), as stored: the EXIF orientation
  is not applied, since the label is drawn on the stored pixels (warned once)."""
  return _decode_image(path).pixels


def _decode_image(path):
  try:
    decoded = image_decode.decode(path, apply_orientation=False)
  except errors.ImageReadError as e:
    raise errors.BadSampleError(str(e)) from e
  if decoded.mode != "RGB":
    warn_once(
        ("image_mode", decoded.mode),
        f"{path}: image mode {decoded.mode!r}, converting to RGB (warned once per mode)",
    )
  if decoded.orientation != 1:
    warn_once(
        ("image_orientation",),
        f"{path}: EXIF orientation {decoded.orientation} not applied: dataset images are "
        "read as stored, as their labels are drawn on the stored pixels (warned once)",
    )
  return decoded


def read_label_raw(path, im=None):
  """uint8 [H, W] raw values; palette PNGs read as indices, 16-bit must fit in 8 bits."""
  im = im if im is not None else _open(path, "label")
  if im.mode in ("L", "P"):
    return np.asarray(im)
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(im)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      raise errors.BadSampleError(
          f"{path}: 16-bit label with values {arr.min()}..{arr.max()}, expected "
          "values that fit in 8 bits"
      )
    return arr.astype(np.uint8)
  raise errors.BadSampleError(
      f"{path}: label mode {im.mode!r}, expected a single-channel (L or palette) PNG"
  )


def map_label(raw, path, name, num_classes):
  kind = label_kind(path)
  lut = label_table(name, kind, num_classes)
  mapped = lut[raw]
  if (mapped < 0).any():
    bad = np.unique(raw[mapped < 0])
    raise errors.BadSampleError(
        f"{path}: label values {bad[:10].tolist()} outside the class range, expected "
        + expected_values(name, kind, num_classes)
    )
  return mapped.astype(np.uint8)


def label_rules(data_config, num_classes):
  """The folder dataset's mask rules (config + colours of classes.txt); None for the
  datasets whose label values are fixed by their layout."""
  if data_config.name != folder.NAME:
    return None
  listed = folder.read_classes(folder.classes_path(data_config))
  return folder.rules(data_config, num_classes, listed.colours)


def read_folder_mask(path, rules):
  """A folder dataset's mask as train ids: class ids (L, palette, 16-bit) or an RGB
  colour mask (alpha dropped)."""
  im = _open(path, "mask")
  if im.mode in ("RGB", "RGBA", "RGBX"):
    return folder.map_colours(np.asarray(im.convert("RGB")), path, rules)
  return folder.map_ids(read_label_raw(path, im), path, rules)


def load_sample(sample, name, num_classes, rules=None):
  """Decode and check one sample: `{"image", "label", "name"}`. `rules`: the folder
  dataset's `label_rules` (default: class ids 0..num_classes-1, 255 ignore)."""
  decoded = _decode_image(sample.image_path)
  image = decoded.pixels
  if name == folder.NAME:
    raw = read_folder_mask(sample.label_path, rules or folder.LabelRules(num_classes))
  else:
    raw = read_label_raw(sample.label_path)
  if raw.shape != image.shape[:2]:
    hint = ""
    if (
        decoded.orientation != 1
        and raw.shape == image_decode.orient(image, decoded.orientation).shape[:2]
    ):
      hint = (
          f"; the image's EXIF orientation {decoded.orientation} would give the label's "
          "size, but dataset images are read as stored: save the image with its pixels "
          "rotated and no orientation tag"
      )
    raise errors.BadSampleError(
        f"{sample.label_path}: label size {raw.shape[1]}x{raw.shape[0]} (WxH) differs "
        f"from its image {sample.image_path} {image.shape[1]}x{image.shape[0]}{hint}"
    )
  label = raw if name == folder.NAME else map_label(raw, sample.label_path, name, num_classes)
  return {"image": image, "label": label, "name": sample.name}


def check_example(example, num_classes, where):
  """Checks a decoded example (from any source) against `data.num_classes`."""
  label = example["label"]
  bad = (label >= num_classes) & (label != IGNORE)
  if bad.any():
    raise errors.BadSampleError(
        f"{where}: train ids {np.unique(label[bad])[:10].tolist()} >= "
        f"data.num_classes={num_classes}"
    )
  return example


class RawSource:
  """grain random-access source over the raw files of one split.

  With `on_bad_sample="skip"` a bad sample is replaced by the next good one
  (index + 1, + 2, ... modulo the length), so the stream stays deterministic.
  """

  def __init__(self, name, root, split, num_classes, on_bad_sample="error", rules=None):
    if on_bad_sample not in ("error", "skip"):
      raise ValueError(f"config.data.on_bad_sample={on_bad_sample!r}: expected 'error' or 'skip'")
    self.name, self.num_classes, self.on_bad_sample = name, num_classes, on_bad_sample
    self.rules = rules
    self.samples = list_samples(name, root, split)

  def __len__(self):
    return len(self.samples)

  def load(self, index):
    return load_sample(self.samples[index], self.name, self.num_classes, self.rules)

  def __getitem__(self, index):
    return get_with_replacement(self, index)

  def __repr__(self):
    return f"RawSource({self.name}, {len(self)} samples)"


def get_with_replacement(source, index):
  n = len(source)
  for k in range(n):
    try:
      return source.load((index + k) % n)
    except errors.BadSampleError as e:
      if source.on_bad_sample == "error":
        raise
      warn_once(("skip", str(e)), f"skipping bad sample: {e}")
  raise errors.BadSampleError(f"{source!r}: every sample is bad")
