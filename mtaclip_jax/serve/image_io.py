"""The images `predict` reads: files, folders and globs expanded (decoded by
`data.image_decode`), and their output names."""

from __future__ import annotations

import glob
import os
from typing import Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def expand_images(specs: Sequence[str]) -> list[str]:
  """Files, folders (their images, sorted) and glob patterns -> list of paths."""
  paths = []
  for spec in specs:
    if os.path.isdir(spec):
      paths += sorted(
          os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTENSIONS)
      )
    elif os.path.exists(spec):
      paths.append(spec)
    else:
      matches = sorted(glob.glob(spec))
      if not matches:
        raise FileNotFoundError(f"--images {spec!r}: no such file, folder or matching glob")
      paths += [m for m in matches if not os.path.isdir(m)]
  return paths


def output_names(paths: Sequence[str]) -> list[str]:
  """File stems, made unique with a numeric suffix."""
  seen, names = {}, []
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    k = seen.get(stem, 0)
    seen[stem] = k + 1
    names.append(stem if k == 0 else f"{stem}_{k}")
  return names
