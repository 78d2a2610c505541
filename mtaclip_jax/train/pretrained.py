"""Converted weights put into a freshly initialised train state: CLIP towers, another
registered backbone, or transformers' Mask2Former pixel decoder and decoder."""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

import convert_weights
from convert_weights import clip_sources
from convert_weights.mask2former_hf import convert_mask2former_hf
from mtaclip_jax import errors
from mtaclip_jax.train import optim

log = logging.getLogger(__name__)


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
  meta, towers = convert_weights.load_converted(config.init.clip)
  arch = meta.get("arch")
  if "text" not in towers:
    raise errors.ConfigError(
        f"config.init.clip={config.init.clip!r} holds {arch} backbone "
        "weights without a CLIP text tower; pass it as config.init.backbone"
    )
  targets = []
  if arch == config.model.backbone:
    targets.append(("backbone", towers["image"]))
  if arch == config.model.text_encoder and config.model.text_queries:
    targets.append(("text_encoder", towers["text"]))
  if not targets:
    raise errors.ConfigError(
        f"config.init.clip={config.init.clip!r} holds {arch} weights but "
        f"config.model.backbone={config.model.backbone!r} and "
        f"config.model.text_encoder={config.model.text_encoder!r}"
    )
  return _prefixed(targets), [f"{arch} {p}" for p, _ in targets]


def _backbone_updates(config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """The image tower of config.init.backbone (a convert_weights folder of any
  registered backbone: CLIP, ViT-S/16, MiT-B4...)."""
  meta, towers = convert_weights.load_converted(config.init.backbone)
  arch = meta.get("arch")
  if arch != config.model.backbone:
    raise errors.ConfigError(
        f"config.init.backbone={config.init.backbone!r} holds {arch} weights "
        f"but config.model.backbone={config.model.backbone!r}"
    )
  return _prefixed([("backbone", towers["image"])]), [f"{arch} backbone"]


def _mask2former_updates(config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """Pixel decoder + decoder from a transformers Mask2Former state dict file."""
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
        raise errors.ConfigError(
            f"both {loaded_by[top]!r} and {source!r} hold weights for "
            f"{top}/; set only one of config.init.clip / config.init.backbone"
        )
      loaded_by[top] = source
    for coll, flat in updates.items():
      dest = params if coll == "params" else stats
      for key, value in flat.items():
        if key not in dest:
          raise errors.ConfigError(
              f"{source}: {coll}/{key} does not exist in the model "
              f"({config.model.backbone}, {config.model.num_classes} classes)"
          )
        if tuple(dest[key].shape) != tuple(np.shape(value)):
          raise errors.ConfigError(
              f"{source}: {coll}/{key} has shape {np.shape(value)}, the "
              f"model expects {tuple(dest[key].shape)}"
          )
        dest[key] = np.asarray(value, dest[key].dtype)
    prefixes = {k.split("/")[0] for k in updates["params"]}
    kept = [k for k in params if k.split("/")[0] in prefixes and k not in updates["params"]]
    log.info(
        "loaded %d tensors (%s) from %s; %d parameters of those modules keep their "
        "initial values%s",
        sum(len(u) for u in updates.values()),
        ", ".join(what),
        source,
        len(kept),
        f" (e.g. {', '.join(kept[:4])})" if kept else "",
    )
  shard = lambda tree, like: jax.tree.map(
      lambda v, l: jax.device_put(np.asarray(v, l.dtype), l.sharding), tree, like
  )
  return state.replace(
      params=shard(optim.unflatten(params), state.params),
      batch_stats=shard(optim.unflatten(stats), state.batch_stats)
      if state.batch_stats
      else state.batch_stats,
  )
