"""Config and run checks made before anything is built: every one-line error a bad
config or workdir gets comes from here."""

from __future__ import annotations

import logging
import os
import shutil

import jax
import ml_collections
from PIL import Image

from mtaclip_jax import errors
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import readers
from mtaclip_jax.data import transforms
from mtaclip_jax.models import backbones
from mtaclip_jax.objective.matching import hungarian

log = logging.getLogger(__name__)


MIN_FREE_BYTES = 1 << 30


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Cross-field checks a typo or a bad override would otherwise hit an hour in."""
  n = data_classes.num_classes(config.data)
  if config.model.num_classes != n:
    raise errors.ConfigError(
        f"config.model.num_classes={config.model.num_classes} but "
        f"config.data.num_classes={n}; they must agree"
    )
  if config.loss.similarity and not config.model.text_queries:
    raise errors.ConfigError("config.loss.similarity=True needs config.model.text_queries=True")
  if config.train.on_nan not in ("stop", "skip"):
    raise errors.ConfigError(
        f"config.train.on_nan={config.train.on_nan!r}: expected 'stop' " "or 'skip'"
    )
  matcher = config.loss.get("matcher", "host")
  if matcher not in hungarian.MATCHERS:
    raise errors.ConfigError(
        f"config.loss.matcher={matcher!r}: expected 'host' (scipy through "
        "a callback) or 'device' (in XLA)"
    )
  if config.model.dtype not in ("float32", "bfloat16"):
    raise errors.ConfigError(
        f"config.model.dtype={config.model.dtype!r}: expected 'float32' " "or 'bfloat16'"
    )
  h, w = config.data.crop_size
  if h % 32 or w % 32:
    raise errors.ConfigError(
        f"config.data.crop_size={tuple(config.data.crop_size)}: both sides "
        "must be multiples of 32 (the backbone's largest stride)"
    )
  if config.optim.total_steps != config.train.steps:
    log.warning(
        "config.optim.total_steps=%d differs from config.train.steps=%d: "
        "the poly schedule ends at optim.total_steps",
        config.optim.total_steps,
        config.train.steps,
    )


def check_workdir(workdir: str) -> None:
  """Fail before training if the workdir cannot be written or the disk is full."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.WorkdirError(f"workdir {workdir!r} is not writable: {e}") from e
  free = shutil.disk_usage(workdir).free
  if free < MIN_FREE_BYTES:
    raise errors.WorkdirError(
        f"workdir {workdir!r} has only {free / 2**20:.0f} MiB free; "
        f"checkpoints need at least {MIN_FREE_BYTES / 2**30:.0f} GiB"
    )


def check_crop(config: ml_collections.ConfigDict) -> None:
  """With padding disabled (no pad after random_crop in config.data.transforms), every
  training image must be at least the crop after the resizes before it: checked from
  the image headers of a raw dataset (a TFDS one is checked per image as it is read)."""
  ops = transforms.parse(list(config.data.transforms))
  last = transforms.unpadded_crop(ops)
  if last is None or config.data.get("source", "raw") != "raw":
    return
  size = tuple(transforms.op_arg("random_crop", ops[last][1], "size"))
  for sample in readers.list_samples(config.data.name, config.data.root, "train"):
    try:
      with Image.open(sample.image_path) as im:
        w, h = im.size
    except OSError:
      continue  # reported by the reader, naming the file, when it is read
    small = (h, w)  # the smallest the image can be when it reaches the crop
    for name, kwargs in ops[:last]:
      if name in ("resize", "random_resize"):
        scale = transforms.op_arg(name, kwargs, "scale")
        if name == "random_resize":
          ratio = min(transforms.op_arg(name, kwargs, "ratio_range"))
          scale = (int(scale[0] * ratio), int(scale[1] * ratio))
        small = transforms.rescale_size(small[0], small[1], scale)
    if small[0] < size[0] or small[1] < size[1]:
      raise errors.ConfigError(
          f"config.data.transforms: random_crop(size={size}) has no pad(...) after it "
          f"(padding disabled), but {sample.image_path} ({h}x{w} HxW) can be "
          f"{small[0]}x{small[1]} after the resizes before the crop; add "
          f"pad(size={size}) after random_crop, or lower config.data.crop_size"
      )


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  b, n = config.data.batch_size, mesh.shape["data"]
  if b % n:
    raise errors.ConfigError(
        f"config.data.batch_size={b} is not divisible by the mesh's data "
        f"axis ({n} devices); use a multiple of {n}"
    )
  if b % jax.process_count():
    raise errors.ConfigError(
        f"config.data.batch_size={b} is not divisible by the " f"{jax.process_count()} processes"
    )
  m = int(config.train.get("micro_batches", 1))
  if m < 1 or b % (m * n):
    raise errors.ConfigError(
        f"config.train.micro_batches={m}: the batch of {b} must split into "
        f"{m} micro-batches that each still divide over the mesh's data axis "
        f"({n} devices), i.e. batch_size % (micro_batches * {n}) == 0"
    )


def check_pretrained(config: ml_collections.ConfigDict) -> None:
  """Paper configs train from converted weights: refuse to start without the ones the
  model needs (its image tower; with text queries, a CLIP text tower), unless
  `config.init.allow_random=True` asks for random initialisation on purpose."""
  init = config.get("init") or ml_collections.ConfigDict()
  if init.get("allow_random", False) or config.model.backbone not in backbones.REGISTRY:
    return  # an unknown backbone is named where the model is built
  backbone = backbones.get(config.model.backbone)
  text_encoder = config.model.get("text_encoder") or backbone.default_text_encoder
  has_clip, has_backbone = bool(init.get("clip")), bool(init.get("backbone"))
  missing = []
  if backbone.family != "clip" and not has_backbone:
    missing.append(
        f"the {backbone.name} image tower: --config.init.backbone=DIR, written by "
        f"`python -m convert_weights --src WEIGHTS --out DIR --arch {backbone.name}`"
    )
  clip_towers = []  # [(arch, tower)] that config.init.clip would hold
  if backbone.family == "clip" and not (has_clip or has_backbone):
    clip_towers.append((backbone.name, "image"))
  if config.model.text_queries and not has_clip:
    clip_towers.append((text_encoder, "text"))
  for arch in dict.fromkeys(a for a, _ in clip_towers):
    towers = " and ".join(t for a, t in clip_towers if a == arch)
    src = _CLIP_FILES.get(arch, "CLIP_WEIGHTS")
    flag = " --allow-torchscript" if arch in _CLIP_FILES else ""
    missing.append(
        f"the CLIP {arch} {towers} tower{'s' if ' and ' in towers else ''}: "
        f"--config.init.clip=DIR, written by "
        f"`python -m convert_weights --src {src} --out DIR{flag}`"
    )
  if missing:
    raise errors.ConfigError(
        f"{config.model.backbone} model without pretrained weights: give "
        + "; and ".join(missing)
        + " (docs/REPRODUCE.md). To train from random initialisation on purpose, "
        "pass --config.init.allow_random=True"
    )


# OpenAI's CLIP files (TorchScript archives, as `clip.load` downloads them).
_CLIP_FILES = {"RN50": "RN50.pt", "RN101": "RN101.pt", "ViT-B/16": "ViT-B-16.pt"}
