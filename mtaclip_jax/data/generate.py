"""Writes a small synthetic dataset in the real ADE20k or Cityscapes layout, or in the
folder layout (data/folder.py) with class names of your choice.

    python -m mtaclip_jax.data.generate --layout ade20k --out DIR --train 20 --val 8 \
        --seed 0 [--size 128x160] [--num-classes 8]
    python -m mtaclip_jax.data.generate --layout folder --out DIR \
        [--names surface,scratch,dent,rust,paint]

Every class is a colour + texture family (class 0 is the textured background);
an image holds a few shapes of other classes at random scale and position, and
some ignore regions (thin outlines, noise patches). Deterministic per seed.
"""

import argparse
import colorsys
import logging
import os
import sys

import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from mtaclip_jax.data import classes
from mtaclip_jax.data import folder

log = logging.getLogger(__name__)

ADE_DIR = "ADEChallengeData2016"
CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld"),
}
TEXTURES = 8
# The folder layout's made-up names (class 0 is the textured background).
FOLDER_NAMES = ("surface", "scratch", "dent", "rust", "paint")


def class_colour(c):
  h = (c * 0.618034) % 1.0
  s = 0.55 + 0.4 * ((c * 0.37) % 1.0)
  v = 0.55 + 0.4 * ((c * 0.71) % 1.0)
  return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255.0


def texture(c, yy, xx, phase):
  """Pattern in [0, 1] for class c: family c % 8, frequency from c // 8."""
  f = 2 * np.pi / (6.0 + 3.0 * ((c // TEXTURES) % 4))
  fam = c % TEXTURES
  if fam == 0:
    t = np.sin(yy * f + phase)
  elif fam == 1:
    t = np.sin((xx + yy) * f * 0.7 + phase)
  elif fam == 2:
    t = np.sign(np.sin(xx * f * 0.5 + phase) * np.sin(yy * f * 0.5))
  elif fam == 3:
    t = np.sin(xx * f) * np.sin(yy * f + phase)
  elif fam == 4:
    t = np.sin(np.sqrt(xx * xx + yy * yy) * f + phase)
  elif fam == 5:
    t = np.sin(xx * f + phase)
  elif fam == 6:
    t = np.sign(np.sin((xx - yy) * f * 0.5 + phase))
  else:
    t = np.maximum(np.sin(xx * f + phase), np.sin(yy * f))
  return 0.5 + 0.5 * t


def render(rng, height, width, num_classes):
  """(image uint8 [H, W, 3], label int [H, W] with class ids, -1 = ignore)."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  label = np.zeros((height, width), np.int32)
  ignore = Image.new("L", (width, height), 0)
  draw_ignore = ImageDraw.Draw(ignore)
  short = min(height, width)
  for _ in range(int(rng.integers(2, 7)) if num_classes > 1 else 0):
    c = int(rng.integers(1, num_classes))
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    size = short * rng.uniform(0.2, 0.7)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    kind = int(rng.integers(3))
    box = [
        cx - size / 2,
        cy - size * rng.uniform(0.3, 0.7),
        cx + size / 2,
        cy + size * rng.uniform(0.3, 0.7),
    ]
    if kind == 0:
      draw.ellipse(box, fill=1)
    elif kind == 1:
      draw.rectangle(box, fill=1)
    else:
      n = int(rng.integers(3, 7))
      ang = np.sort(rng.uniform(0, 2 * np.pi, n))
      rad = size / 2 * rng.uniform(0.6, 1.0, n)
      draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(ang, rad)], fill=1)
    label[np.asarray(mask, bool)] = c
    if rng.random() < 0.4:  # unlabeled outline, as ADE annotations have
      draw_ignore.ellipse(box, outline=1, width=int(rng.integers(1, 3)))
  if rng.random() < 0.3:
    h, w = rng.uniform(0.05, 0.15, 2) * (height, width)
    y, x = rng.uniform(0, height - h), rng.uniform(0, width - w)
    draw_ignore.rectangle([x, y, x + w, y + h], fill=2)
  ign = np.asarray(ignore)
  image = np.zeros((height, width, 3), np.float32)
  for c in np.unique(label):
    m = label == c
    t = texture(int(c), yy[m], xx[m], rng.uniform(0, 2 * np.pi))
    image[m] = class_colour(int(c)) * (0.6 + 0.4 * t[:, None])
  noise_patch = ign == 2
  image[noise_patch] = rng.uniform(0, 255, (int(noise_patch.sum()), 3))
  image *= rng.uniform(0.85, 1.15)
  image += rng.normal(0, 6.0, image.shape)
  label[ign > 0] = -1
  return np.clip(image, 0, 255).astype(np.uint8), label


def _citys_label_ids():
  """train id -> first Cityscapes labelId with that train id; ignore -> 0."""
  from cityscapesscripts.helpers.labels import labels  # pylint: disable=g-import-not-at-top

  table = {}
  for lab in labels:
    if 0 <= lab.trainId < 19 and lab.id >= 0:
      table.setdefault(lab.trainId, lab.id)
  return np.array([table[t] for t in range(19)], np.uint8)


def write_folder_dataset(out, splits, seed, size, names):
  """The folder layout: classes.txt (names and their colours), images/<split>/*.jpg,
  masks/<split>/*.png (class ids, 255 unlabeled). Returns `out`."""
  names = list(names)
  with open(os.path.join(_made(out), folder.CLASSES_FILE), "w") as f:
    for c, name in enumerate(names):
      f.write(f"{name} {' '.join(str(int(v)) for v in class_colour(c))}\n")
  for split_index, (split, count) in enumerate(sorted(splits.items())):
    for i in range(count):
      rng = np.random.default_rng([seed, split_index, i])
      image, label = render(rng, size[0], size[1], len(names))
      stem = f"{split}_{i + 1:04d}"
      Image.fromarray(image).save(
          os.path.join(_made(out, "images", split), stem + ".jpg"), quality=95
      )
      mask = np.where(label < 0, folder.IGNORE, label).astype(np.uint8)
      Image.fromarray(mask, mode="L").save(os.path.join(_made(out, "masks", split), stem + ".png"))
  return out


def _made(*parts):
  path = os.path.join(*parts)
  os.makedirs(path, exist_ok=True)
  return path


def write_dataset(layout, out, splits, seed, size, num_classes):
  """splits: {"train": n, "val": m}. Returns the dataset folder."""
  height, width = size
  if layout == folder.NAME:
    names = list(FOLDER_NAMES) + [f"class {c}" for c in range(len(FOLDER_NAMES), num_classes)]
    return write_folder_dataset(out, splits, seed, size, names[:num_classes])
  full = len(classes.DATASETS[layout][0])
  if not 1 <= num_classes <= full:
    raise ValueError(f"--num-classes {num_classes}: expected 1..{full} for {layout}")
  base = os.path.join(out, ADE_DIR) if layout == "ade20k" else out
  ids = _citys_label_ids() if layout == "cityscapes" else None
  for split_index, (split, count) in enumerate(sorted(splits.items())):
    for i in range(count):
      rng = np.random.default_rng([seed, split_index, i])
      image, label = render(rng, height, width, num_classes)
      if layout == "ade20k":
        sdir = {"train": "training", "val": "validation"}[split]
        prefix = {"train": "ADE_train", "val": "ADE_val"}[split]
        stem = f"{prefix}_{i + 1:08d}"
        raw = np.where(label < 0, 0, label + 1).astype(np.uint8)
        img_path = os.path.join(base, "images", sdir, stem + ".jpg")
        lab_path = os.path.join(base, "annotations", sdir, stem + ".png")
        os.makedirs(os.path.dirname(img_path), exist_ok=True)
        os.makedirs(os.path.dirname(lab_path), exist_ok=True)
        Image.fromarray(image).save(img_path, quality=95)
      else:
        cities = CITIES[split]
        city = cities[i % len(cities)]
        stem = f"{city}_{i // len(cities):06d}_{19 + i:06d}"
        raw = np.where(label < 0, 0, ids[np.maximum(label, 0)]).astype(np.uint8)
        img_path = os.path.join(base, "leftImg8bit", split, city, stem + "_leftImg8bit.png")
        lab_path = os.path.join(base, "gtFine", split, city, stem + "_gtFine_labelIds.png")
        os.makedirs(os.path.dirname(img_path), exist_ok=True)
        os.makedirs(os.path.dirname(lab_path), exist_ok=True)
        Image.fromarray(image).save(img_path)
      Image.fromarray(raw, mode="L").save(lab_path)
  return base


def ensure_dataset(data_config) -> None:
  """Generates the demo dataset at data_config.root when `data_config.generate.enabled`
  and it is missing (process 0 only)."""
  g = data_config.get("generate", None)
  if not g or not g.enabled or os.path.isdir(data_config.root):
    return
  out = os.path.dirname(os.path.abspath(data_config.root))
  if data_config.name == "cityscapes":
    out = os.path.abspath(data_config.root)
  if jax.process_index() == 0:
    log.info("generating a dataset at %s", data_config.root)
    write_dataset(
        data_config.name,
        out,
        {"train": g.train, "val": g.val},
        g.seed,
        tuple(g.size),
        data_config.num_classes,
    )


def _size(text):
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW, e.g. 128x160") from e
  return h, w


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layout", choices=("ade20k", "cityscapes", folder.NAME), required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--train", type=int, default=20)
  p.add_argument("--val", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--size", type=_size, default=None, help="HxW (default 128x160 / 128x256)")
  p.add_argument("--num-classes", type=int, default=8)
  p.add_argument(
      "--names",
      default=",".join(FOLDER_NAMES),
      help="folder layout: the class names, comma-separated (class 0 is the background)",
  )
  a = p.parse_args(argv)
  size = a.size or ((128, 256) if a.layout == "cityscapes" else (128, 160))
  names = [n.strip() for n in a.names.split(",")]
  if a.layout == folder.NAME:
    a.num_classes = len(names)
  full = len(classes.DATASETS[a.layout][0]) if a.layout != folder.NAME else 255
  problem = (
      f"--names {a.names!r}: expected distinct non-empty names, comma-separated"
      if a.layout == folder.NAME
      and (not all(names) or len({n.lower() for n in names}) != len(names))
      else f"--num-classes {a.num_classes}: expected 1..{full} for {a.layout}"
      if not 1 <= a.num_classes <= full
      else f"--train {a.train} / --val {a.val}: expected counts >= 0"
      if min(a.train, a.val) < 0
      else f"--size {size[0]}x{size[1]}: expected sides >= 1"
      if min(size) < 1
      else None
  )
  if problem:  # one line, as the other command lines print a bad argument
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  splits = {"train": a.train, "val": a.val}
  if a.layout == folder.NAME:
    base = write_folder_dataset(a.out, splits, a.seed, size, names)
  else:
    base = write_dataset(a.layout, a.out, splits, a.seed, size, a.num_classes)
  print(
      f"wrote {a.train} train + {a.val} val images ({size[0]}x{size[1]}, "
      f"{a.num_classes} classes) to {base}"
  )


if __name__ == "__main__":
  main()
