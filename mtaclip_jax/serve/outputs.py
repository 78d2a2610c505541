"""What `predict` writes per image: the label PNG, the overlay with its legend, and
the per-class pixel fractions as JSON."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw


def cycle_palette(palette: Sequence[Sequence[int]], n: int) -> list[tuple[int, int, int]]:
  return [tuple(int(v) for v in palette[i % len(palette)]) for i in range(n)]


def class_fractions(label: np.ndarray, names: Sequence[str]) -> dict[str, float]:
  counts = np.bincount(label.ravel(), minlength=len(names))[: len(names)]
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
  colours = np.asarray(palette, np.float32)[label]
  blend = np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)
  present = [c for c in np.unique(label) if c < len(names)]
  row, swatch = 14, 10
  width = 12 + swatch + 6 * max(len(names[c]) for c in present) if present else 0
  h, w = label.shape
  canvas = Image.new("RGB", (w + width, max(h, row * len(present) + 4)), (255, 255, 255))
  canvas.paste(Image.fromarray(blend), (0, 0))
  draw = ImageDraw.Draw(canvas)
  for i, c in enumerate(present):
    y = 2 + i * row
    draw.rectangle(
        [w + 4, y + 1, w + 4 + swatch, y + 1 + swatch], fill=tuple(palette[c]), outline=(0, 0, 0)
    )
    draw.text((w + 8 + swatch, y), names[c], fill=(0, 0, 0))
  return canvas


def write_outputs(
    out_dir: str,
    name: str,
    image: np.ndarray,
    label: np.ndarray,
    names: Sequence[str],
    palette: Sequence[Sequence[int]],
    source: str,
) -> dict:
  png = Image.fromarray(label.astype(np.uint8))  # "L"; putpalette makes it "P"
  flat = [v for rgb in palette for v in rgb]
  png.putpalette(flat + [0] * (768 - len(flat)))
  png.save(os.path.join(out_dir, f"{name}_label.png"))
  overlay(image, label, names, palette).save(os.path.join(out_dir, f"{name}_overlay.png"))
  info = {
      "image": source,
      "height": int(label.shape[0]),
      "width": int(label.shape[1]),
      "classes": list(names),
      "fractions": class_fractions(label, names),
  }
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(info, f, indent=1)
  return info
