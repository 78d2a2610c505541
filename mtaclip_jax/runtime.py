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

from mtaclip_jax import optim
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


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  b, n = config.data.batch_size, mesh.shape["data"]
  if b % n:
    raise ConfigError(f"config.data.batch_size={b} is not divisible by the mesh's data "
                      f"axis ({n} devices); use a multiple of {n}")
  if b % jax.process_count():
    raise ConfigError(f"config.data.batch_size={b} is not divisible by the "
                      f"{jax.process_count()} processes")


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


def load_pretrained(state, config: ml_collections.ConfigDict, model):
  """Puts converted CLIP weights (config.init.clip, from convert_weights) into state."""
  del model
  if not config.init.get("clip"):
    return state
  import convert_weights  # pylint: disable=g-import-not-at-top
  meta, towers = convert_weights.load_converted(config.init.clip)
  arch = meta.get("arch")
  if arch not in (config.model.backbone, config.model.text_encoder):
    raise ConfigError(f"config.init.clip={config.init.clip!r} holds {arch} weights but "
                      f"config.model.backbone={config.model.backbone!r}")
  params = optim.flatten(jax.device_get(state.params))
  stats = optim.flatten(jax.device_get(state.batch_stats)) if state.batch_stats else {}
  updates = {"params": {}, "batch_stats": {}}
  targets = []
  if arch == config.model.backbone:
    targets.append(("backbone", towers["image"]))
  if arch == config.model.text_encoder:
    targets.append(("text_encoder", towers["text"]))
  for prefix, variables in targets:
    for coll, tree in variables.items():
      dest = params if coll == "params" else stats
      for path, value in optim.flatten(tree).items():
        key = f"{prefix}/{path}"
        if key not in dest:
          raise ConfigError(f"{config.init.clip}: parameter {coll}/{key} does not exist "
                            "in the model")
        if tuple(dest[key].shape) != tuple(np.shape(value)):
          raise ConfigError(f"{config.init.clip}: {coll}/{key} has shape "
                            f"{np.shape(value)}, the model expects {dest[key].shape}")
        updates[coll][key] = value
  new_params = dict(params, **updates["params"])
  new_stats = dict(stats, **updates["batch_stats"])
  loaded = len(updates["params"]) + len(updates["batch_stats"])
  log.info("loaded %d CLIP tensors (%s) from %s", loaded, arch, config.init.clip)
  shard = lambda tree, like: jax.tree.map(
      lambda v, l: jax.device_put(np.asarray(v, l.dtype), l.sharding), tree, like)
  return state.replace(
      params=shard(optim.unflatten(new_params), state.params),
      batch_stats=shard(optim.unflatten(new_stats), state.batch_stats)
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
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        log.warning("tensorboardX is not installed: no TensorBoard logs")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
