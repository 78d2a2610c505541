"""Scans a dataset's raw files and reports counts, sizes, classes and bad files.

    python -m mtaclip_jax.data.check --config configs/ade20k_r50.py \
        [--config.data.root=DIR] [--splits=train,val]

Exit status 0 when every file is usable, 1 when some are bad, 2 when the dataset
itself cannot be found or the config is wrong: a missing config file, an unknown
`--config.*` key or a bad `data.*` value (checked by `config/validate.py` as for
training) is one `error:` line, as in the other command lines (cli/runner.py).

A command line, so in the command-line layer (it imports the config checks and the
runner) although it sits beside the readers it drives.
"""

import sys

from absl import flags
from ml_collections import config_flags
import numpy as np

from mtaclip_jax import errors
from mtaclip_jax.cli import runner
from mtaclip_jax.config import validate
from mtaclip_jax.data import classes
from mtaclip_jax.data import readers


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "config file with .data", lock_config=True)
  flags.DEFINE_list("splits", None, "splits to scan (default: all present)")
  flags.mark_flags_as_required(["config"])


def scan_split(name, root, split, num_classes, rules=None):
  """Returns {"count", "bad": [(path, why)], "min_hw", "max_hw", "pixels", "images"}.
  `rules`: a folder dataset's `readers.label_rules`."""
  samples = readers.list_samples(name, root, split)
  pixels = np.zeros(num_classes + 1, np.int64)  # last bin: ignore
  images = np.zeros(num_classes, np.int64)
  sizes, bad = [], []
  for s in samples:
    try:
      ex = readers.load_sample(s, name, num_classes, rules)
    except errors.BadSampleError as e:
      bad.append((s.image_path, str(e)))
      continue
    sizes.append(ex["image"].shape[:2])
    cnt = np.bincount(ex["label"].ravel(), minlength=256)
    pixels[:num_classes] += cnt[:num_classes]
    pixels[num_classes] += cnt[classes.IGNORE_LABEL]
    images += cnt[:num_classes] > 0
  sizes = np.array(sizes).reshape(-1, 2)
  return {
      "count": len(samples),
      "bad": bad,
      "pixels": pixels,
      "images": images,
      "min_hw": sizes.min(0).tolist() if len(sizes) else None,
      "max_hw": sizes.max(0).tolist() if len(sizes) else None,
  }


def scan(data_config, splits=None):
  """{split: scan_split(...)}; splits default to those the layout has on disk."""
  num_classes = classes.num_classes(data_config)
  readers.dataset_dir(data_config.name, data_config.root)  # clear error if wrong
  rules = readers.label_rules(data_config, num_classes)
  default = splits is None
  if default:
    splits = ["train", "val"] + (["test"] if data_config.name != "ade20k" else [])
  out = {}
  for split in splits:
    try:
      out[split] = scan_split(data_config.name, data_config.root, split, num_classes, rules)
    except FileNotFoundError as e:
      if default:
        continue
      out[split] = {
          "count": 0,
          "bad": [("-", str(e))],
          "pixels": None,
          "images": None,
          "min_hw": None,
          "max_hw": None,
      }
  return out


def report(data_config, result):
  names = classes.class_names(data_config)
  lines = [f"{data_config.name} at {data_config.root}"]
  for split, r in result.items():
    lines.append(
        f"[{split}] {r['count']} samples, {len(r['bad'])} bad, image HxW "
        f"{r['min_hw']} .. {r['max_hw']}"
    )
    if r["pixels"] is not None and r["pixels"].sum():
      total = r["pixels"].sum()
      for c, n in enumerate(names):
        if r["pixels"][c]:
          lines.append(
              f"  {c:3d} {n:24s} {100 * r['pixels'][c] / total:6.2f}% pixels "
              f"in {r['images'][c]} images"
          )
      lines.append(f"  ignore {100 * r['pixels'][-1] / total:6.2f}% pixels")
    for path, why in r["bad"]:
      lines.append(f"  BAD {path}: {why}")
  return "\n".join(lines)


def main(argv):
  config = flags.FLAGS.config
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments: {argv[1:]}")
    if "data" not in config:
      raise ValueError("--config must name a config file with a .data section")
    validate.validate_data_config(config)
    result = scan(config.data, flags.FLAGS.splits)
  except (FileNotFoundError, ValueError, errors.ClassListError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report(config.data, result))
  sys.exit(1 if any(r["bad"] for r in result.values()) else 0)


if __name__ == "__main__":
  _define_flags()
  runner.run_app(main)
