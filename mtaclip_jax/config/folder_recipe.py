"""The recipe of `configs/folder.py`: the paper recipe on your own folder dataset
(data/folder.py), with defaults for a small dataset (docs/RECIPES.md, "Your own data").

The config file's `arg` takes the dataset keys below and any paper variant
(config/variants.py), comma-separated, in the same `key=value` grammar:

  root=DIR        the dataset folder (classes.txt, images/, masks/); default data/mine
  backbone=NAME   RN50 (default), RN101, ViT-B/16, or the demo-size `tiny`
  crop=N          square training crop (a multiple of 32); default 512
  steps=N         training steps (the poly schedule ends there); default 20000
  batch=N         images per step; default 8

e.g. `configs/folder.py:root=/data/defects,backbone=RN101,crop=384,steps=10000,K=4`.
The CLIP backbones need converted weights, as the paper configs do
(`--config.init.clip=DIR`); `tiny` is a small model trained from random
initialisation, for a quick run on a CPU.
"""

from __future__ import annotations

import ml_collections

from mtaclip_jax.config import recipes
from mtaclip_jax.config import variants
from mtaclip_jax.data import folder

FOLDER_KEYS = ("root", "backbone", "crop", "steps", "batch")
DEFAULTS = dict(root="data/mine", backbone="RN50", crop="512", steps="20000", batch="8")


def split_arg(arg: str | None) -> tuple[dict[str, str], str]:
  """({folder key: value}, the rest as a variant string)."""
  own, rest = dict(DEFAULTS), []
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key = part.partition("=")[0].strip()
    if key in FOLDER_KEYS:
      value = part.partition("=")[2].strip()
      if not value:
        raise ValueError(f"config variant {part!r} in {arg!r}: expected {key}=VALUE")
      own[key] = value
    elif key in variants.VARIANT_KEYS:
      rest.append(part)
    else:
      raise ValueError(
          f"unknown config variant {key!r} in {arg!r}; expected any of "
          f"{', '.join(FOLDER_KEYS + variants.VARIANT_KEYS)} (e.g. "
          "'root=/data/mine,backbone=RN50,crop=512,steps=20000')"
      )
  return own, ",".join(rest)


def _int(key: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"config variant {key}={value!r}: expected an integer") from None


def folder_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper recipe (ADE20k's) on a folder dataset, with `arg`'s keys and variants."""
  own, rest = split_arg(arg)
  backbone = own["backbone"]
  crop = (_int("crop", own["crop"]),) * 2
  steps, batch = _int("steps", own["steps"]), _int("batch", own["batch"])
  c = recipes.paper_config("ade20k", backbone)
  # ADE20k's test scale for its 512 crop, scaled with the crop; slide windows of the
  # crop at 2/3 of it, as the released config's 512 / 341.
  test_scale = (4 * crop[0], crop[0])
  stride = (max(1, 2 * crop[0] // 3),) * 2
  c.model.num_classes = -1  # validate_config: the names of classes.txt
  c.data.update(
      dict(
          name=folder.NAME,
          root=own["root"],
          num_classes=-1,
          crop_size=crop,
          test_scale=test_scale,
          batch_size=batch,
          max_segments=32,
      )
  )
  c.data.transforms = recipes.train_transforms(crop, test_scale)
  c.data.classes_file = ""  # "": ROOT/classes.txt
  c.data.ignore_index = folder.IGNORE
  c.data.reduce_zero_label = False
  c.data.ignore_colour = ""  # RGB masks: the colour of unlabeled pixels, e.g. "#000000"
  # A small dataset: a shorter schedule with a shorter warm-up, evaluated and saved
  # more often.
  c.train.update(dict(steps=steps, checkpoint_every=max(1, min(1000, steps // 4)), log_every=50))
  c.optim.warmup_steps = min(500, steps // 10)
  c.eval.update(
      dict(
          crop_size=crop,
          stride=stride,
          test_scale=test_scale,
          every_steps=max(1, min(2000, steps // 4)),
      )
  )
  if backbone == "tiny":
    # The demo's model and optimiser (configs/demo.py): nothing to load, one pass per
    # image at evaluation.
    c.model.update(recipes.DEMO_MODEL)
    c.data.max_segments = recipes.DEMO_MODEL["num_queries"]
    c.loss.num_points = 1024
    c.optim.update(dict(lr=1e-3, warmup_start_factor=1e-6, clip_norm=1.0))
    c.data.num_workers = 0
    c.eval.update(dict(mode="whole", ms_mode="whole"))
    c.init.allow_random = True
  variants.apply_variant(c, rest)  # last, so that nothing above overrides it
  return c
