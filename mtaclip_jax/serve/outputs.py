"""What `predict` writes per image: the label PNG, the overlay with its legend, and
the per-class pixel fractions as JSON."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw

# Rows per part when a large image is blended or counted (float copies stay small).
_ROWS = 128


def cycle_palette(palette: Sequence[Sequence[int]], n: int) -> list[tuple[int, int, int]]:
  return [tuple(int(v) for v in palette[i % len(palette)]) for i in range(n)]


def class_counts(label: np.ndarray, n: int) -> np.ndarray:
  """Pixels of each class 0..n-1 (a large label counted in parts: bincount copies
  its input to int64)."""
  counts = np.zeros(n, np.int64)
  for y in range(0, label.shape[0], _ROWS):
    counts += np.bincount(label[y : y + _ROWS].ravel(), minlength=n)[:n]
  return counts


def class_fractions(label: np.ndarray, names: Sequence[str]) -> dict[str, float]:
  counts = class_counts(label, len(names))
  return {n: float(c) / label.size for n, c in zip(names, counts)}


def overlay(
    image: np.ndarray,
    label: np.ndarray,
    names: Sequence[str],
    palette: Sequence[Sequence[int]],
    alpha: float = 0.5,
):
  """PIL image: `image` blended with the class colours, and a legend panel of the
  classes present to its right (the image keeps its size in the left part)."""
  present = np.flatnonzero(class_counts(label, len(names))).tolist()
  row, swatch = 14, 10
  width = 12 + swatch + 6 * max(len(names[c]) for c in present) if present else 0
  h, w = label.shape
  canvas = Image.new("RGB", (w + width, max(h, row * len(present) + 4)), (255, 255, 255))
  colours = np.asarray(palette, np.float32)
  for y in range(0, h, _ROWS):  # a large image's float copies, in parts
    mixed = (1 - alpha) * image[y : y + _ROWS] + alpha * colours[label[y : y + _ROWS]]
    canvas.paste(Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8)), (0, y))
  draw = ImageDraw.Draw(canvas)
  for i, c in enumerate(present):
    y = 2 + i * row
    draw.rectangle(
        [w + 4, y + 1, w + 4 + swatch, y + 1 + swatch], fill=tuple(palette[c]), outline=(0, 0, 0)
    )
    draw.text((w + 8 + swatch, y), names[c], fill=(0, 0, 0))
  return canvas


def output_files(out_dir: str, name: str) -> list[str]:
  """The label PNG, overlay PNG and JSON paths of `name`."""
  return [os.path.join(out_dir, name + s) for s in ("_label.png", "_overlay.png", ".json")]


def remove_outputs(out_dir: str, name: str) -> None:
  """Removes what `write_outputs` wrote of `name` (after it failed part way)."""
  for path in output_files(out_dir, name):
    try:
      os.remove(path)
    except OSError:
      pass  # never written, or a folder in its way


def label_png(label: np.ndarray, palette: Sequence[Sequence[int]]):
  """The label map as a palette PNG image (pixel value = class index)."""
  png = Image.fromarray(label.astype(np.uint8))  # "L"; putpalette makes it "P"
  flat = [v for rgb in palette for v in rgb]
  png.putpalette(flat + [0] * (768 - len(flat)))
  return png


def write_outputs(
    out_dir: str,
    name: str,
    image: np.ndarray,
    label: np.ndarray,
    names: Sequence[str],
    palette: Sequence[Sequence[int]],
    source: str,
) -> dict:
  label_path, overlay_path, json_path = output_files(out_dir, name)
  label_png(label, palette).save(label_path)
  overlay(image, label, names, palette).save(overlay_path)
  info = {
      "image": source,
      "height": int(label.shape[0]),
      "width": int(label.shape[1]),
      "classes": list(names),
      "fractions": class_fractions(label, names),
  }
  with open(json_path, "w") as f:
    json.dump(info, f, indent=1)
  return info
