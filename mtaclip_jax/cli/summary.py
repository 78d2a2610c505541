"""Model summary: parameters per top-level module, FLOPs and memory from XLA.

  python -m mtaclip_jax.summary --config configs/ade20k_r50.py
  python -m mtaclip_jax.summary --config configs/ade20k_r50.py --batch 2 --params_only

Parameters come from `jax.eval_shape` of the init (nothing is materialised).
FLOPs and memory come from `jax.jit(f).lower(...).compile()` `cost_analysis()` /
`memory_analysis()` on the default backend; XLA counts a multiply-add as 2
FLOPs (fvcore, which Mask2Former's papers quote, counts it as 1).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mtaclip_jax.cli import runner
from mtaclip_jax.config import recipes
from mtaclip_jax.config import validate
from mtaclip_jax.models import backbones
from mtaclip_jax.models import mtaclip
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import optim
from mtaclip_jax.train import train_state


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "model/training config file")
  flags.DEFINE_integer("batch", 1, "images per forward / train step")
  flags.DEFINE_string("size", None, "image HxW (default: config.data.crop_size)")
  flags.DEFINE_bool("params_only", False, "skip compiling (no FLOPs/memory)")
  flags.DEFINE_bool("train_step", True, "also compile a train step")


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def abstract_inputs(config, batch: int, size: tuple[int, int]):
  images = jax.ShapeDtypeStruct((batch, size[0], size[1], 3), jnp.float32)
  c1 = config.model.num_classes + 1
  tokens = jax.ShapeDtypeStruct((c1, config.model.get("class_length", 5)), jnp.int32)
  return images, tokens


def param_table(config, model) -> tuple[list[tuple[str, int, int]], Any]:
  """[(top-level name, trainable, frozen)] and the abstract variables."""
  images, tokens = abstract_inputs(config, 1, (128, 128))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)
  optim_cfg = config.get("optim")
  rules = (
      [tuple(r) for r in optim_cfg.lr_mult_rules]
      if optim_cfg and "lr_mult_rules" in optim_cfg
      else list(recipes.LR_MULT_RULES)
  )
  rows: dict[str, list[int]] = {}
  for path, leaf in _flat(variables["params"]).items():
    mult = next((m for p, m in rules if re.search(p, path)), 1.0)
    row = rows.setdefault(path.split("/")[0], [0, 0])
    row[0 if mult != 0.0 else 1] += int(np.prod(leaf.shape))
  return [(k, t, f) for k, (t, f) in rows.items()], variables


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  mem = compiled.memory_analysis()
  out = {"flops": float(cost.get("flops", float("nan")))}
  if mem is not None:
    out["peak_bytes"] = float(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    out["temp_bytes"] = float(mem.temp_size_in_bytes)
  return out


def forward_cost(model, variables, images, tokens) -> dict[str, float]:
  fn = jax.jit(functools.partial(model.apply, train=False))
  return _cost(fn.lower(variables, images, tokens).compile())


def train_cost(config, model, images, tokens) -> tuple[dict[str, float], str]:
  """Cost of the real train step (loss, matching, optimizer) on fake targets."""
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = optim.make_optimizer(config.optim)
  b = images.shape[0]
  t = int(config.data.max_segments)
  h, w = images.shape[1:3]
  batch = {
      "image": images,
      "label": jax.ShapeDtypeStruct((b, h, w), jnp.int32),
      "masks": jax.ShapeDtypeStruct((b, t, h, w), jnp.uint8),
      "classes": jax.ShapeDtypeStruct((b, t), jnp.int32),
      "valid": jax.ShapeDtypeStruct((b, t), jnp.bool_),
  }
  with jax.set_mesh(mesh):
    state = train_state.abstract_state(model, tx, config, tokens, jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_state.train_step, model=model, tx=tx, config=config))
    return _cost(step.lower(state, batch, tokens).compile()), "train_state.train_step"


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # jax's backend probing is INFO
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  validate.validate_config(config)
  model = mtaclip.build_model(config.model)
  rows, variables = param_table(config, model)
  bb = backbones.get(config.model.backbone)
  print(
      f"model: backbone={bb.name} ({bb.family}, channels "
      f"{'/'.join(map(str, bb.channels))}) text_encoder={model.text_encoder} classes="
      f"{config.model.num_classes} text_queries={config.model.text_queries} "
      f"dtype={config.model.dtype}"
  )
  print(f"{'module':<16}{'trainable':>14}{'frozen':>14}")
  for name, t, f in rows:
    print(f"{name:<16}{t:>14,}{f:>14,}")
  tt, tf = sum(r[1] for r in rows), sum(r[2] for r in rows)
  print(f"{'total':<16}{tt:>14,}{tf:>14,}   ({(tt + tf) / 1e6:.2f}M)")
  if flags.FLAGS.params_only:
    return
  if flags.FLAGS.size:
    size = tuple(int(v) for v in flags.FLAGS.size.lower().split("x"))
  else:
    size = tuple(config.data.crop_size)
  images, tokens = abstract_inputs(config, flags.FLAGS.batch, size)
  print(f"backend {jax.default_backend()}, batch {flags.FLAGS.batch}, image {size[0]}x{size[1]}")
  fwd = forward_cost(model, variables, images, tokens)
  print(
      f"forward: {fwd['flops'] / 1e9:.1f} GFLOPs (XLA, multiply-add = 2), "
      f"peak memory {fwd.get('peak_bytes', float('nan')) / 2**30:.2f} GiB"
  )
  if flags.FLAGS.train_step:
    cost, what = train_cost(config, model, images, tokens)
    print(
        f"train step [{what}]: {cost['flops'] / 1e9:.1f} GFLOPs, "
        f"peak memory {cost.get('peak_bytes', float('nan')) / 2**30:.2f} GiB"
    )


def cli():
  _define_flags()
  runner.run_app(main)


if __name__ == "__main__":
  cli()
