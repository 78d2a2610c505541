"""AdamW with warmup + poly decay and per-parameter rules (docs/RECIPES.md).

Parameter groups are regexes over "/"-joined parameter paths (`config.optim.
lr_mult_rules`: first match wins; `no_decay_rules`: any match). A learning-rate
multiplier of 0 freezes a parameter: it is left out of the optimizer and of the
gradient altogether (`split_trainable`), so no optimizer state and no weight gradient
is ever computed for it, as `requires_grad=False` does in PyTorch.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

from flax import traverse_util
import jax.numpy as jnp
import ml_collections
import optax

Params = Mapping[str, Any]


def flatten(tree: Params) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def lr_multiplier(path: str, rules: Iterable[tuple[str, float]]) -> float:
  for pattern, mult in rules:
    if re.search(pattern, path):
      return float(mult)
  return 1.0


def uses_weight_decay(path: str, no_decay_rules: Iterable[str]) -> bool:
  return not any(re.search(p, path) for p in no_decay_rules)


def describe_rules(params: Params, cfg: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """Which parameters each rule caught: {"lr x0.1": [...], "no decay": [...], ...}."""
  groups: dict[str, list[str]] = {}
  for path in flatten(params):
    mult = lr_multiplier(path, cfg.lr_mult_rules)
    decay = uses_weight_decay(path, cfg.no_decay_rules)
    groups.setdefault(f"lr x{mult:g}", []).append(path)
    groups.setdefault("decay" if decay else "no decay", []).append(path)
  return groups


def split_trainable(
    params: Params, cfg: ml_collections.ConfigDict
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Flat (trainable, frozen) dicts; frozen = lr multiplier 0."""
  trainable, frozen = {}, {}
  for path, value in flatten(params).items():
    (frozen if lr_multiplier(path, cfg.lr_mult_rules) == 0.0 else trainable)[path] = value
  return trainable, frozen


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from lr * start_factor over warmup_steps, then poly to min_lr.

  Matches mmengine's LinearLR(start_factor, end=warmup) followed by
  PolyLR(eta_min, power, begin=warmup, end=total_steps). `total_steps` -1 (the recipes'
  default: follow config.train.steps) must be filled in first (validate_config).
  """
  warmup = int(cfg.warmup_steps)
  total = int(cfg.total_steps)
  lr, start = float(cfg.lr), float(cfg.warmup_start_factor)

  def schedule(step):
    # -1 ("follow config.train.steps") is filled in by config/validate.py before a run.
    assert total >= 1, f"config.optim.total_steps={total} was not filled in by validate_config"
    step = jnp.asarray(step, jnp.float32)
    warm = lr * (start + (1.0 - start) * jnp.minimum(step / max(warmup, 1), 1.0))
    frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    poly = (lr - cfg.min_lr) * (1.0 - frac) ** cfg.poly_power + cfg.min_lr
    return jnp.where(step < warmup, warm, poly)

  return schedule


def _scale_by_path(fn: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each update of a flat {path: array} tree by fn(path)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return {k: u * fn(k) if fn(k) != 1.0 else u for k, u in updates.items()}, state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer over the flat dict of trainable parameters (see split_trainable).

  Update = -lr(step) * mult(path) * (adam(g) + wd * decay(path) * p), as torch AdamW
  with per-group lr = base * mult; gradients clipped by global L2 norm first.
  """
  decay_mask = lambda flat: {k: uses_weight_decay(k, cfg.no_decay_rules) for k in flat}
  schedule = learning_rate_schedule(cfg)
  chain = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain += [
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
      _scale_by_path(lambda k: lr_multiplier(k, cfg.lr_mult_rules)),
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*chain)
