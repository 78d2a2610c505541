"""The folder dataset (`config.data.name="folder"`): your own images, masks and class
names (docs/DATA.md, "Your own data").

    ROOT/classes.txt                       one class name per line, in label order,
                                           optionally followed by a colour
    ROOT/images/{train,val[,test]}/STEM.*  jpg, png, bmp, webp, tif; any sizes
    ROOT/masks/{train,val[,test]}/STEM.png the mask of images/<split>/STEM.*

A mask is either single-channel (L, palette read as indices, 16-bit) holding class
ids, where `data.ignore_index` (default 255) is unlabeled and `data.reduce_zero_label`
makes 0 unlabeled and v the class v - 1; or an RGB image whose colours are the ones
classes.txt lists, and `data.ignore_colour` (e.g. "#000000") the unlabeled pixels. A
line of classes.txt is `name`, `name r g b` or `name #rrggbb`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np

from mtaclip_jax import errors

NAME = "folder"
CLASSES_FILE = "classes.txt"
IGNORE = 255
SPLITS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "validation": "val",
    "test": "test",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUT = (
    "ROOT/classes.txt, ROOT/images/{train,val}/STEM.jpg|png|..., ROOT/masks/{train,val}/STEM.png"
)

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")
_INT = re.compile(r"^[+-]?\d+$")


@dataclasses.dataclass(frozen=True)
class ClassList:
  """names: the class names in label order; colours: an (r, g, b) per name, or None
  where its line gives none; path: the classes.txt they were read from."""

  names: tuple[str, ...]
  colours: tuple[tuple[int, int, int] | None, ...]
  path: str


@dataclasses.dataclass(frozen=True)
class LabelRules:
  """How the masks of a folder dataset become train ids (hashable: a cache key)."""

  num_classes: int
  ignore_index: int = IGNORE
  reduce_zero_label: bool = False
  colours: tuple[tuple[int, int, int] | None, ...] = ()
  ignore_colour: tuple[int, int, int] | None = None  # unlabeled pixels of RGB masks


# ---------------------------------------------------------------- classes.txt


def classes_path(data_config) -> str:
  """`data.classes_file`, or ROOT/classes.txt when it is empty."""
  given = data_config.get("classes_file", "") or ""
  if given:
    return os.path.abspath(os.path.expanduser(given))
  return os.path.abspath(os.path.join(os.path.expanduser(data_config.root or ""), CLASSES_FILE))


def read_classes(path: str) -> ClassList:
  """The parsed classes.txt at `path` (cached while the file is unchanged)."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise errors.ClassListError(
        f"{path}: no class list ({e.strerror}); a folder dataset needs {CLASSES_FILE} "
        "in its root (one class name per line, docs/DATA.md) or config.data.classes_file"
    ) from e
  return _parse_cached(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _parse_cached(path: str, mtime_ns: int, size: int) -> ClassList:
  del mtime_ns, size  # the cache key: a changed file is read again
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise errors.ClassListError(f"{path}: cannot read the class list ({e})") from e
  return parse_classes(text, path)


def parse_classes(text: str, path: str = CLASSES_FILE) -> ClassList:
  """Parses the text of a classes.txt; blank lines at the end are allowed."""
  lines = text.splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise errors.ClassListError(f"{path}: empty class list; expected one class name per line")
  names, colours, seen = [], [], {}
  for number, line in enumerate(lines, 1):
    name, colour = _parse_line(line, f"{path}:{number}")
    key = name.lower()  # the CLIP tokenizer lowercases: "Rust" and "rust" are one prompt
    if key in seen:
      raise errors.ClassListError(
          f"{path}:{number}: class name {name!r} duplicates line {seen[key]}; "
          "every class needs its own name"
      )
    seen[key] = number
    names.append(name)
    colours.append(colour)
  given = {}
  for i, colour in enumerate(colours):
    if colour is not None:
      if colour in given:
        raise errors.ClassListError(
            f"{path}:{i + 1}: colour {colour} of {names[i]!r} is also the colour of "
            f"{names[given[colour]]!r} (line {given[colour] + 1}); colours must differ"
        )
      given[colour] = i
  return ClassList(tuple(names), tuple(colours), path)


def parse_colour(text: str) -> tuple[int, int, int] | None:
  """`#rrggbb`, `r g b` or `r,g,b` -> (r, g, b); None if `text` is none of these."""
  text = text.strip()
  if _HEX.match(text):
    return (int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16))
  words = text.replace(",", " ").split()
  if len(words) == 3 and all(_INT.match(w) and 0 <= int(w) <= 255 for w in words):
    return tuple(int(w) for w in words)
  return None


def _parse_line(line: str, where: str):
  words = line.split()
  if not words:
    raise errors.ClassListError(f"{where}: empty class name; expected one name per line")
  colour = None
  if words[-1].startswith("#"):
    if not _HEX.match(words[-1]):
      raise errors.ClassListError(
          f"{where}: bad colour {words[-1]!r}; expected #rrggbb (6 hex digits) or r g b"
      )
    h = words[-1][1:]
    colour = (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
    words = words[:-1]
  else:
    trailing = 0
    while trailing < len(words) and _INT.match(words[-1 - trailing]):
      trailing += 1
    # One trailing number is part of a name ("class 2"); the last three are a colour
    # ("class 2 10 20 30"); two are a colour with a value missing.
    if trailing >= 2:
      shown = " ".join(words[-min(trailing, 3) :])
      values = [int(w) for w in words[-3:]] if trailing >= 3 else []
      if not values or not all(0 <= v <= 255 for v in values):
        raise errors.ClassListError(
            f"{where}: bad colour {shown!r}; expected three values 0..255 (r g b) or "
            "#rrggbb after the name"
        )
      colour = tuple(values)
      words = words[:-3]
  if not words:
    raise errors.ClassListError(f"{where}: a colour without a class name")
  return " ".join(words), colour


# ---------------------------------------------------------------- layout


def dataset_dir(root: str) -> str:
  if not root:
    raise FileNotFoundError("config.data.root is empty: expected the folder dataset's root")
  base = os.path.expanduser(root)
  if all(os.path.isdir(os.path.join(base, m)) for m in ("images", "masks")):
    return base
  raise FileNotFoundError(f"config.data.root={root!r} is not a folder dataset: expected {LAYOUT}")


def split_dir_name(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split {split!r} of a folder dataset: expected one of {sorted(SPLITS)}")
  return SPLITS[split]


def _files(folder: str, extensions) -> dict[str, str]:
  """{stem: path} of the files with these extensions (case-insensitive)."""
  out, clash = {}, []
  for entry in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(entry)
    if ext.lower() not in extensions or not os.path.isfile(os.path.join(folder, entry)):
      continue
    if stem in out:
      clash.append(f"{os.path.basename(out[stem])} and {entry}")
    out[stem] = os.path.join(folder, entry)
  if clash:
    raise errors.BadSampleError(
        f"{folder}: two files with one stem ({'; '.join(clash[:5])}); a stem names one sample"
    )
  return out


def list_pairs(root: str, split: str) -> list[tuple[str, str, str]]:
  """Sorted (image path, mask path, stem) of one split; stems that do not pair are
  an error naming them."""
  base = dataset_dir(root)
  sdir = split_dir_name(split)
  img_dir = os.path.join(base, "images", sdir)
  mask_dir = os.path.join(base, "masks", sdir)
  if not os.path.isdir(img_dir):
    raise FileNotFoundError(f"no folder {img_dir}: expected the {sdir} images there ({LAYOUT})")
  images = _files(img_dir, IMAGE_EXTENSIONS)
  if not images:
    exts = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
    raise FileNotFoundError(f"no images in {img_dir}: expected files ending in {exts}")
  if not os.path.isdir(mask_dir):
    raise FileNotFoundError(f"no folder {mask_dir}: expected the masks of {img_dir} there")
  masks = _files(mask_dir, (".png",))
  lonely_images = sorted(set(images) - set(masks))
  lonely_masks = sorted(set(masks) - set(images))
  if lonely_images or lonely_masks:
    parts = []
    if lonely_images:
      parts.append(
          f"{len(lonely_images)} image(s) without a mask of their stem in {mask_dir}: "
          + _some(images[s] for s in lonely_images)
      )
    if lonely_masks:
      parts.append(
          f"{len(lonely_masks)} mask(s) without an image of their stem in {img_dir}: "
          + _some(masks[s] for s in lonely_masks)
      )
    raise errors.BadSampleError(f"stems that do not pair in split {sdir!r}: " + "; ".join(parts))
  return [(images[s], masks[s], s) for s in sorted(images)]


def _some(paths, limit=5) -> str:
  paths = [os.path.basename(p) for p in paths]
  more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
  return ", ".join(paths[:limit]) + more


# ---------------------------------------------------------------- masks


def rules(data_config, num_classes: int, colours=()) -> LabelRules:
  ignore_colour = data_config.get("ignore_colour", "") or ""
  return LabelRules(
      num_classes=int(num_classes),
      ignore_index=int(data_config.get("ignore_index", IGNORE)),
      reduce_zero_label=bool(data_config.get("reduce_zero_label", False)),
      colours=tuple(colours),
      ignore_colour=parse_colour(ignore_colour) if ignore_colour else None,
  )


@functools.lru_cache(maxsize=None)
def id_table(r: LabelRules) -> np.ndarray:
  """int32 LUT raw id -> train id (255 ignore), -1 for values beyond the classes."""
  lut = np.full(256, -1, np.int32)
  if r.reduce_zero_label:
    lut[0] = IGNORE
    lut[1 : r.num_classes + 1] = np.arange(min(r.num_classes, 255))
  else:
    lut[: r.num_classes] = np.arange(r.num_classes)
  lut[r.ignore_index] = IGNORE
  return lut


def expected_ids(r: LabelRules) -> str:
  n = r.num_classes
  if r.reduce_zero_label:
    ids = f"0 (unlabeled, data.reduce_zero_label=True) or 1..{n}"
  else:
    ids = f"0..{n - 1}"
  return f"class ids {ids} for the {n} names of {CLASSES_FILE}, or {r.ignore_index} (data.ignore_index)"


def map_ids(raw: np.ndarray, path: str, r: LabelRules) -> np.ndarray:
  mapped = id_table(r)[raw]
  if (mapped < 0).any():
    bad = np.unique(raw[mapped < 0])
    raise errors.BadSampleError(
        f"{path}: mask value {bad[:10].tolist()} beyond the classes: expected " + expected_ids(r)
    )
  return mapped.astype(np.uint8)


def map_colours(rgb: np.ndarray, path: str, r: LabelRules) -> np.ndarray:
  """uint8 [H, W, 3] colour mask -> train ids through the colours of classes.txt."""
  listed = {c: i for i, c in enumerate(r.colours) if c is not None}
  if r.ignore_colour is not None:
    listed.setdefault(r.ignore_colour, IGNORE)  # config check: no class has it
  if len(listed) == (r.ignore_colour is not None):
    raise errors.BadSampleError(
        f"{path}: an RGB colour mask, but {CLASSES_FILE} gives no colours; add one per "
        "line ('name r g b' or 'name #rrggbb') or store class ids in a single-channel PNG"
    )
  packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
  values, inverse = np.unique(packed.ravel(), return_inverse=True)
  ids = np.empty(len(values), np.uint8)
  for k, v in enumerate(values.tolist()):
    colour = (v >> 16, (v >> 8) & 255, v & 255)
    if colour not in listed:
      unlabeled = (
          f" or {r.ignore_colour} (data.ignore_colour)"
          if r.ignore_colour is not None
          else "; set data.ignore_colour if it marks unlabeled pixels"
      )
      shown = sorted(c for c in listed if c != r.ignore_colour)
      raise errors.BadSampleError(
          f"{path}: colour {colour} (#{v:06x}) is not in {CLASSES_FILE}; expected one of "
          f"the listed colours {shown[:8]}{' ...' if len(shown) > 8 else ''}{unlabeled}"
      )
    ids[k] = listed[colour]
  return ids[inverse].reshape(rgb.shape[:2])
