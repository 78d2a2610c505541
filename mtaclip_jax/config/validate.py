"""Config and run checks made before anything is built: every one-line error a bad
config or workdir gets comes from here."""

from __future__ import annotations

import logging
import os
import shutil
import socket

import jax
import ml_collections

from convert_weights import clip_io
from mtaclip_jax import errors
from mtaclip_jax.config import keys
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import folder
from mtaclip_jax.data import image_decode
from mtaclip_jax.data import readers
from mtaclip_jax.data import transforms
from mtaclip_jax.models import backbones
from mtaclip_jax.models import clip

log = logging.getLogger(__name__)


MIN_FREE_BYTES = 1 << 30


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every key with a constrained value (keys.py's table), then the checks across
  keys, before anything is built: the first problem is a `ConfigError` naming the key,
  its value and what was expected. Also fills the derived value
  `optim.total_steps=-1` with `train.steps`, and a folder dataset's `num_classes=-1`
  (data and model) with the number of names in its classes.txt."""
  _fill_class_count(config)
  _check_values(_flatten(config))
  _check_data(config.data)
  _check_across_keys(config)
  if config.optim.total_steps == -1:
    config.optim.total_steps = config.train.steps
  elif config.optim.total_steps != config.train.steps:
    log.warning(
        "config.optim.total_steps=%d differs from config.train.steps=%d: "
        "the poly schedule ends at optim.total_steps",
        config.optim.total_steps,
        config.train.steps,
    )


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """`validate_config` for a command that reads only the dataset (`python -m
  mtaclip_jax.data.check`): every `data.*` key and the checks among them, so that a
  config with a `data` section alone, or one of a model this machine cannot run, is
  checked the same way. Fills `data.num_classes=-1` as `validate_config` does."""
  _fill_class_count(config)
  _check_values({f"data.{k}": v for k, v in _flatten(config.data).items()})
  _check_data(config.data)


def _check_values(flat: dict) -> None:
  for key, value in flat.items():
    expected = keys.problem(key, value)
    if expected is not None:
      raise errors.ConfigError(f"config.{key}={_show(value)}: expected {expected}")


def _fill_class_count(config: ml_collections.ConfigDict) -> None:
  """A folder dataset's class count from its classes.txt (read and checked here, so a
  missing or malformed list is one error before anything is built)."""
  if "data" not in config or config.data.get("name") != folder.NAME:
    return
  n = data_classes.num_classes(config.data)
  if config.data.get("num_classes", -1) == -1:
    config.data.num_classes = n
  if "model" in config and config.model.get("num_classes", -1) == -1:
    config.model.num_classes = n


def _flatten(config) -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update({f"{key}.{k}": v for k, v in _flatten(value).items()})
    else:
      out[key] = value
  return out


def _show(value) -> str:
  return repr(tuple(value) if isinstance(value, list) else value)


def _check_data(d: ml_collections.ConfigDict) -> None:
  """The checks among the `data.*` keys."""
  names = data_classes.all_class_names(d)
  if d.num_classes > len(names):
    raise errors.ConfigError(
        f"config.data.num_classes={d.num_classes}: expected 1..{len(names)} for {d.name!r}"
    )
  if d.name == folder.NAME:
    _check_ignore_index(d, names)
    _check_ignore_colour(d)
  g = d.get("generate")
  if g is not None and g.enabled:
    for key in ("train", "val"):
      if g[key] < 1:
        raise errors.ConfigError(
            f"config.data.generate.{key}={g[key]}: a generated dataset needs at least "
            "one image per split (or config.data.generate.enabled=False)"
        )
    if min(g.size) < 1:
      raise errors.ConfigError(
          f"config.data.generate.size={_show(g.size)}: expected a pair (h, w) of ints >= 1"
      )


def _check_across_keys(c: ml_collections.ConfigDict) -> None:
  if c.model.num_classes != c.data.num_classes:
    raise errors.ConfigError(
        f"config.model.num_classes={c.model.num_classes} but "
        f"config.data.num_classes={c.data.num_classes}; they must agree"
    )
  m = c.model
  if c.loss.similarity and not m.text_queries:
    raise errors.ConfigError(
        "config.loss.similarity=True needs config.model.text_queries=True (the "
        "similarity loss compares mask queries with text queries; the baseline has none)"
    )
  if c.eval.head == "similarity" and not m.text_queries:
    raise errors.ConfigError(
        "config.eval.head='similarity' needs config.model.text_queries=True "
        "(use config.eval.head='class' for the baseline)"
    )
  if m.text_queries and not m.get("similarity_heads", True):
    if c.loss.similarity:
      raise errors.ConfigError(
          "config.loss.similarity=True needs config.model.similarity_heads=True (the "
          "loss compares the mask and text queries through those heads)"
      )
    if c.eval.head == "similarity":
      raise errors.ConfigError(
          "config.eval.head='similarity' needs config.model.similarity_heads=True "
          "(use config.eval.head='class' for a model without the similarity heads)"
      )
  if c.data.max_segments > m.num_queries:
    raise errors.ConfigError(
        f"config.data.max_segments={c.data.max_segments} exceeds "
        f"config.model.num_queries={m.num_queries}: every ground-truth segment must be "
        "matched to a query"
    )
  for heads in ("enc_heads", "dec_heads"):
    if m.hidden_dim % m[heads]:
      raise errors.ConfigError(
          f"config.model.hidden_dim={m.hidden_dim} is not divisible by "
          f"config.model.{heads}={m[heads]}"
      )
  text_encoder = m.get("text_encoder") or backbones.get(m.backbone).default_text_encoder
  limit = clip.ARCHS[text_encoder].context_length
  if m.class_length + m.context_length > limit:
    raise errors.ConfigError(
        f"config.model.class_length={m.class_length} + config.model.context_length="
        f"{m.context_length} exceeds the {limit} tokens of the {text_encoder} text encoder"
    )
  if m.get("attention_impl") == "cudnn":
    if m.dtype != "bfloat16":
      raise errors.ConfigError(
          "config.model.attention_impl='cudnn' needs config.model.dtype='bfloat16' "
          f"(cuDNN's fused attention), got {m.dtype!r}"
      )
    if jax.default_backend() != "gpu":
      raise errors.ConfigError(
          "config.model.attention_impl='cudnn' needs an NVIDIA GPU; this process runs "
          f"on {jax.default_backend()!r} (use 'xla')"
      )
  splits = readers.split_table(c.data.name)
  if c.eval.split not in splits:
    raise errors.ConfigError(
        f"config.eval.split={c.eval.split!r}: expected one of {sorted(splits)} for "
        f"{c.data.name!r}"
    )
  micro = c.train.get("micro_batches", 1)
  if c.data.batch_size % micro:
    raise errors.ConfigError(
        f"config.train.micro_batches={micro}: the batch of {c.data.batch_size} "
        "(config.data.batch_size) must split into that many equal micro-batches"
    )


def _check_ignore_index(d: ml_collections.ConfigDict, names) -> None:
  ignore = d.get("ignore_index", folder.IGNORE)
  shift = 1 if d.get("reduce_zero_label", False) else 0
  if shift <= ignore < len(names) + shift:
    raise errors.ConfigError(
        f"config.data.ignore_index={ignore} is the mask value of class "
        f"{names[ignore - shift]!r} (config.data.reduce_zero_label="
        f"{bool(shift)}); expected a value no class uses, e.g. 255"
    )


def _check_ignore_colour(d: ml_collections.ConfigDict) -> None:
  given = d.get("ignore_colour", "") or ""
  if not given:
    return
  colour = folder.parse_colour(str(given))
  if colour is None:
    raise errors.ConfigError(
        f"config.data.ignore_colour={given!r}: expected '#rrggbb' or 'r g b' (0..255), "
        "or '' for none"
    )
  listed = folder.read_classes(folder.classes_path(d))
  if colour in listed.colours:
    name = listed.names[listed.colours.index(colour)]
    raise errors.ConfigError(
        f"config.data.ignore_colour={given!r} is the colour of class {name!r} in "
        f"{listed.path}; expected a colour no class uses"
    )


def check_workdir(workdir: str) -> None:
  """Fail before training if the workdir cannot be written or the disk is full."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # A name of this process's own: the processes of a multi-process run check a
    # shared workdir at the same time.
    probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
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


def check_paths(config: ml_collections.ConfigDict, data: bool = True, init: bool = True) -> None:
  """Every path a run will read, before anything is built or created: the dataset
  (`data.root`, or `data.tfds_dir` for a TFDS source; a demo dataset that will be
  generated is not there yet) and the converted weights of `config.init`."""
  if data:
    d = config.data
    if d.get("source", "raw") == "tfds":
      if not os.path.isdir(os.path.expanduser(d.tfds_dir)):
        raise errors.ConfigError(
            f"config.data.tfds_dir={d.tfds_dir!r}: no such folder (config.data.source="
            "'tfds' reads the ArrayRecord shards there; docs/DATA.md)"
        )
    elif not (d.get("generate") and d.generate.enabled and not os.path.exists(d.root)):
      try:
        readers.dataset_dir(d.name, d.root)
      except FileNotFoundError as e:
        raise errors.ConfigError(str(e)) from e
  if not init or "init" not in config:
    return
  for key in ("clip", "backbone"):
    folder = config.init.get(key, "")
    if folder and not os.path.isfile(os.path.join(os.path.expanduser(folder), clip_io.META)):
      what = (
          "no such folder"
          if not os.path.isdir(os.path.expanduser(folder))
          else f"no {clip_io.META} in it"
      )
      raise errors.ConfigError(
          f"config.init.{key}={folder!r}: {what}; expected a folder written by "
          "`python -m convert_weights --src WEIGHTS --out DIR`"
      )
  path = config.init.get("mask2former", "")
  if path and not os.path.isfile(os.path.expanduser(path)):
    raise errors.ConfigError(
        f"config.init.mask2former={path!r}: no such file; expected a transformers "
        "Mask2FormerForUniversalSegmentation state dict (.safetensors, .bin or .pth)"
    )


def check_checkpoints(workdir: str) -> None:
  """`--mode eval`, predict and export read a checkpoint: refuse a workdir without
  one before anything is built (and without creating anything in it)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = [n for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
  if not steps:
    where = directory if os.path.isdir(workdir) else f"{workdir!r} (no such folder)"
    raise errors.CheckpointError(
        f"no checkpoint in {where}: --workdir must be the folder a training run wrote"
    )


def check_crop(config: ml_collections.ConfigDict) -> None:
  """With padding disabled (no pad after random_crop in config.data.transforms), every
  training image must be at least the crop after the resizes before it: checked from
  the image headers of a raw dataset (a TFDS one is checked per image as it is read).
  A header that cannot be read, or that declares more pixels than the decoder accepts
  (`image_decode.MAX_PIXELS`), is the reader's one-line `BadSampleError` naming the
  file, here before anything is built (with `data.on_bad_sample="skip"` it is left to
  the reader, which skips that image)."""
  ops = transforms.parse(list(config.data.transforms))
  last = transforms.unpadded_crop(ops)
  if last is None or config.data.get("source", "raw") != "raw":
    return
  size = tuple(transforms.op_arg("random_crop", ops[last][1], "size"))
  skip = config.data.get("on_bad_sample", "error") == "skip"
  for sample in readers.list_samples(config.data.name, config.data.root, "train"):
    try:
      w, h = image_decode.header_size(sample.image_path)
    except errors.ImageReadError as e:
      if skip:
        continue
      raise errors.BadSampleError(str(e)) from e
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
