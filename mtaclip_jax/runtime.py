"""What the train loop needs around the step: checks, data, class tokens, logging,
pretrained weights, periodic evaluation. Kept out of train.py so the loop stays short.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mtaclip_jax import matching, optim
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import pipeline

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 1 << 30


class ConfigError(ValueError):
  pass


class WorkdirError(OSError):
  pass


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Cross-field checks a typo or a bad override would otherwise hit an hour in."""
  n = data_classes.num_classes(config.data)
  if config.model.num_classes != n:
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} but "
                      f"config.data.num_classes={n}; they must agree")
  if config.loss.similarity and not config.model.text_queries:
    raise ConfigError("config.loss.similarity=True needs config.model.text_queries=True")
  if config.train.on_nan not in ("stop", "skip"):
    raise ConfigError(f"config.train.on_nan={config.train.on_nan!r}: expected 'stop' "
                      "or 'skip'")
  matcher = config.loss.get("matcher", "host")
  if matcher not in matching.MATCHERS:
    raise ConfigError(f"config.loss.matcher={matcher!r}: expected 'host' (scipy through "
                      "a callback) or 'device' (in XLA)")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: expected 'float32' "
                      "or 'bfloat16'")
  h, w = config.data.crop_size
  if h % 32 or w % 32:
    raise ConfigError(f"config.data.crop_size={tuple(config.data.crop_size)}: both sides "
                      "must be multiples of 32 (the backbone's largest stride)")
  if config.optim.total_steps != config.train.steps:
    log.warning("config.optim.total_steps=%d differs from config.train.steps=%d: "
                    "the poly schedule ends at optim.total_steps",
                    config.optim.total_steps, config.train.steps)


def check_workdir(workdir: str) -> None:
  """Fail before training if the workdir cannot be written or the disk is full."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir!r} is not writable: {e}") from e
  free = shutil.disk_usage(workdir).free
  if free < MIN_FREE_BYTES:
    raise WorkdirError(f"workdir {workdir!r} has only {free / 2**20:.0f} MiB free; "
                       f"checkpoints need at least {MIN_FREE_BYTES / 2**30:.0f} GiB")


def check_crop(config: ml_collections.ConfigDict) -> None:
  """With padding disabled (no pad after random_crop in config.data.transforms), every
  training image must be at least the crop after the resizes before it: checked from
  the image headers of a raw dataset (a TFDS one is checked per image as it is read)."""
  # pylint: disable=g-import-not-at-top
  from PIL import Image
  from mtaclip_jax.data import readers, transforms
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
      raise ConfigError(
          f"config.data.transforms: random_crop(size={size}) has no pad(...) after it "
          f"(padding disabled), but {sample.image_path} ({h}x{w} HxW) can be "
          f"{small[0]}x{small[1]} after the resizes before the crop; add "
          f"pad(size={size}) after random_crop, or lower config.data.crop_size")


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  b, n = config.data.batch_size, mesh.shape["data"]
  if b % n:
    raise ConfigError(f"config.data.batch_size={b} is not divisible by the mesh's data "
                      f"axis ({n} devices); use a multiple of {n}")
  if b % jax.process_count():
    raise ConfigError(f"config.data.batch_size={b} is not divisible by the "
                      f"{jax.process_count()} processes")
  m = int(config.train.get("micro_batches", 1))
  if m < 1 or b % (m * n):
    raise ConfigError(f"config.train.micro_batches={m}: the batch of {b} must split into "
                      f"{m} micro-batches that each still divide over the mesh's data axis "
                      f"({n} devices), i.e. batch_size % (micro_batches * {n}) == 0")


def class_tokens(config: ml_collections.ConfigDict) -> jax.Array:
  from mtaclip_jax.models import tokenizer  # pylint: disable=g-import-not-at-top
  names = data_classes.class_names(config.data) + [config.data.none_class_name]
  return jnp.asarray(tokenizer.tokenize_class_names(names, config.model.class_length))


def ensure_dataset(config: ml_collections.ConfigDict) -> None:
  """Generates the demo dataset at data.root when `data.generate.enabled` and missing."""
  g = config.data.get("generate", None)
  if not g or not g.enabled or os.path.isdir(config.data.root):
    return
  from mtaclip_jax.data import generate  # pylint: disable=g-import-not-at-top
  out = os.path.dirname(os.path.abspath(config.data.root))
  if config.data.name == "cityscapes":
    out = os.path.abspath(config.data.root)
  if jax.process_index() == 0:
    log.info("generating a dataset at %s", config.data.root)
    generate.write_dataset(config.data.name, out, {"train": g.train, "val": g.val},
                           g.seed, tuple(g.size), config.data.num_classes)


def _prefixed(targets) -> dict:
  """[(top-level module, converted variables)] -> {"params"|"batch_stats": {path: array}}."""
  updates = {"params": {}, "batch_stats": {}}
  for prefix, variables in targets:
    for coll, tree in variables.items():
      for path, value in optim.flatten(tree).items():
        updates[coll][f"{prefix}/{path}"] = value
  return updates


def _clip_updates(config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """{"params"|"batch_stats": {path: array}} from config.init.clip (convert_weights)."""
  import convert_weights  # pylint: disable=g-import-not-at-top
  meta, towers = convert_weights.load_converted(config.init.clip)
  arch = meta.get("arch")
  if "text" not in towers:
    raise ConfigError(f"config.init.clip={config.init.clip!r} holds {arch} backbone "
                      "weights without a CLIP text tower; pass it as config.init.backbone")
  targets = []
  if arch == config.model.backbone:
    targets.append(("backbone", towers["image"]))
  if arch == config.model.text_encoder and config.model.text_queries:
    targets.append(("text_encoder", towers["text"]))
  if not targets:
    raise ConfigError(f"config.init.clip={config.init.clip!r} holds {arch} weights but "
                      f"config.model.backbone={config.model.backbone!r} and "
                      f"config.model.text_encoder={config.model.text_encoder!r}")
  return _prefixed(targets), [f"{arch} {p}" for p, _ in targets]


def _backbone_updates(config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """The image tower of config.init.backbone (a convert_weights folder of any
  registered backbone: CLIP, ViT-S/16, MiT-B4...)."""
  import convert_weights  # pylint: disable=g-import-not-at-top
  meta, towers = convert_weights.load_converted(config.init.backbone)
  arch = meta.get("arch")
  if arch != config.model.backbone:
    raise ConfigError(f"config.init.backbone={config.init.backbone!r} holds {arch} weights "
                      f"but config.model.backbone={config.model.backbone!r}")
  return _prefixed([("backbone", towers["image"])]), [f"{arch} backbone"]


def _mask2former_updates(config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """Pixel decoder + decoder from a transformers Mask2Former state dict file."""
  # pylint: disable=g-import-not-at-top
  from convert_weights import clip_sources
  from convert_weights.mask2former_hf import convert_mask2former_hf
  state = clip_sources.unwrap(clip_sources.load_file(config.init.mask2former, False))
  converted = convert_mask2former_hf(state)
  updates = {"params": {}, "batch_stats": {}}
  for prefix, tree in converted.items():
    for path, value in optim.flatten(tree).items():
      updates["params"][f"{prefix}/{path}"] = value
  return updates, ["Mask2Former pixel_decoder", "decoder"]


def load_pretrained(state, config: ml_collections.ConfigDict, model=None):
  """Puts converted weights into the initialised state: CLIP towers from
  config.init.clip (a `python -m convert_weights` output folder), a backbone from
  config.init.backbone (same, any registered backbone) and the pixel decoder + decoder
  from config.init.mask2former (a transformers Mask2Former state dict file).

  Every loaded tensor must exist in the model with the same shape (else an error
  naming it); model parameters the source lacks (e.g. the ViT FPN adapters, or the
  text-query parts of the decoder) keep their initial values and are listed.
  """
  del model
  sources = []
  if config.init.get("clip"):
    sources.append((config.init.clip, _clip_updates))
  if config.init.get("backbone"):
    sources.append((config.init.backbone, _backbone_updates))
  if config.init.get("mask2former"):
    sources.append((config.init.mask2former, _mask2former_updates))
  if not sources:
    return state
  params = optim.flatten(jax.device_get(state.params))
  stats = optim.flatten(jax.device_get(state.batch_stats)) if state.batch_stats else {}
  loaded_by = {}
  for source, read in sources:
    updates, what = read(config)
    for top in {k.split("/")[0] for k in updates["params"]}:
      if top in loaded_by:
        raise ConfigError(f"both {loaded_by[top]!r} and {source!r} hold weights for "
                          f"{top}/; set only one of config.init.clip / config.init.backbone")
      loaded_by[top] = source
    for coll, flat in updates.items():
      dest = params if coll == "params" else stats
      for key, value in flat.items():
        if key not in dest:
          raise ConfigError(f"{source}: {coll}/{key} does not exist in the model "
                            f"({config.model.backbone}, {config.model.num_classes} classes)")
        if tuple(dest[key].shape) != tuple(np.shape(value)):
          raise ConfigError(f"{source}: {coll}/{key} has shape {np.shape(value)}, the "
                            f"model expects {tuple(dest[key].shape)}")
        dest[key] = np.asarray(value, dest[key].dtype)
    prefixes = {k.split("/")[0] for k in updates["params"]}
    kept = [k for k in params if k.split("/")[0] in prefixes and k not in updates["params"]]
    log.info("loaded %d tensors (%s) from %s; %d parameters of those modules keep their "
             "initial values%s", sum(len(u) for u in updates.values()), ", ".join(what),
             source, len(kept), f" (e.g. {', '.join(kept[:4])})" if kept else "")
  shard = lambda tree, like: jax.tree.map(
      lambda v, l: jax.device_put(np.asarray(v, l.dtype), l.sharding), tree, like)
  return state.replace(
      params=shard(optim.unflatten(params), state.params),
      batch_stats=shard(optim.unflatten(stats), state.batch_stats)
      if state.batch_stats else state.batch_stats)


class Runtime:
  """Per-run services: data, logs, progress, evaluation."""

  def __init__(self, config, workdir, mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.is_main = jax.process_index() == 0
    ensure_dataset(config)

  def class_tokens(self):
    return class_tokens(self.config)

  def train_iterator(self):
    return pipeline.make_train_iterator(self.config.data, self.config.data.seed)

  def metric_writer(self):
    return MetricWriter(self.workdir, enabled=self.is_main)

  def progress(self, start, total):
    return tqdm.tqdm(total=total, initial=start, desc="train", unit="step",
                     disable=not self.is_main, dynamic_ncols=True, file=sys.stderr)

  def log_metrics(self, writer, step, metrics, bar):
    writer.write(step, {f"train/{k}": v for k, v in metrics.items()})
    bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}",
                    lr=f"{metrics.get('lr', 0):.2e}")

  def evaluate(self, model, state, class_tokens, step, writer) -> dict:
    from mtaclip_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    dataset = pipeline.make_eval_dataset(self.config.data, self.config.eval.split)
    results = evaluate_lib.evaluate_model(
        model, state.variables(), class_tokens, dataset, self.config,
        class_names=data_classes.class_names(self.config.data),
        workdir=self.workdir if self.is_main else None, step=step,
        progress=self.is_main)
    writer.write(step, {f"eval/{k}": results[k] for k in ("mIoU", "mAcc", "aAcc")})
    log.info("step %d: mIoU %.2f mAcc %.2f aAcc %.2f", step, results["mIoU"],
             results["mAcc"], results["aAcc"])
    return {f"eval_{k}": results[k] for k in ("mIoU", "mAcc", "aAcc")}

  def has_eval_results(self, step) -> bool:
    from mtaclip_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    return os.path.exists(evaluate_lib.results_path(self.workdir, step))

  def print_summary(self, seconds):
    if not self.is_main:
      return
    w = os.path.abspath(self.workdir)
    print(f"\ntraining finished in {seconds / 60:.1f} min\n"
          f"  checkpoints: {w}/checkpoints\n  TensorBoard: tensorboard --logdir {w}/tb\n"
          f"  metrics:     {w}/metrics.jsonl\n  evaluation:  {w}/eval/", flush=True)


class MetricWriter:
  """JSON lines + TensorBoard event files (tensorboardX: no TensorFlow needed)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      self._jsonl = open(self.path, "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        log.warning("tensorboardX is not installed: no TensorBoard logs")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    try:
      self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars})
                        + "\n")
      self._jsonl.flush()
    except OSError as e:
      raise WorkdirError(
          f"cannot write metrics to {self.path} at step {step}: {e}. If the disk is "
          "full, free space and run the same command again: training resumes from the "
          "last complete checkpoint, which is intact") from e
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
