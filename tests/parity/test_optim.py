"""Optimizer: schedule, parameter rules, and equality with torch AdamW per group."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtaclip_jax.config import recipes
from mtaclip_jax.models import mtaclip
from mtaclip_jax.train import optim


def cfg(**kw):
  c = recipes.optim_defaults()
  c.total_steps = 1000
  c.warmup_steps = 100
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_schedule_matches_mmengine_linear_then_poly():
  c = cfg()
  s = optim.learning_rate_schedule(c)
  lr = c.lr
  # mmengine LinearLR: factor goes linearly from start_factor to 1 over warmup.
  for step in (0, 1, 50, 99):
    expect = lr * (c.warmup_start_factor + (1 - c.warmup_start_factor) * step / 100)
    np.testing.assert_allclose(float(s(step)), expect, rtol=1e-6)
  # PolyLR from the end of warmup to total: (1 - t/T)^0.9, eta_min 0.
  for step in (100, 400, 999, 1000):
    expect = lr * (1 - (step - 100) / 900) ** 0.9
    np.testing.assert_allclose(float(s(step)), expect, rtol=1e-4, atol=1e-12)  # fp32


FAKE_PARAMS = {
    "backbone": {
        "conv1": {"kernel": 1},
        "bn1": {"scale": 1, "bias": 1},
        "layer1": {"0": {"conv1": {"kernel": 1}}},
    },
    "text_encoder": {
        "token_embedding": {"embedding": 1},
        "positional_embedding": 1,
        "ln_final": {"scale": 1, "bias": 1},
        "transformer": {"resblocks": {"0": {"attn": {"in_proj_weight": 1}}}},
    },
    "contexts": 1,
    "pixel_decoder": {
        "level_embed": 1,
        "input_proj_0": {"gn": {"scale": 1}},
        "encoder": {
            "layers_0": {"self_attn_layer_norm": {"scale": 1}, "fc1": {"kernel": 1, "bias": 1}}
        },
    },
    "decoder": {
        "query_feat": {"embedding": 1},
        "query_embed": {"embedding": 1},
        "gamma": 1,
        "class_embed": {"kernel": 1},
        "decoder_norm": {"scale": 1},
    },
}


def test_rules_catch_the_right_parameters():
  groups = optim.describe_rules(FAKE_PARAMS, cfg())
  for name, paths in sorted(groups.items()):  # printed for the reader (pytest -s)
    print(f"{name}: {len(paths)}\n  " + "\n  ".join(sorted(paths)))
  assert all(p.startswith("text_encoder/") for p in groups["lr x0"])
  assert len(groups["lr x0"]) == 5
  assert sorted(groups["lr x0.1"]) == sorted(
      [
          "backbone/conv1/kernel",
          "backbone/bn1/scale",
          "backbone/bn1/bias",
          "backbone/layer1/0/conv1/kernel",
      ]
  )
  no_decay = set(groups["no decay"])
  for p in [
      "backbone/bn1/scale",
      "backbone/bn1/bias",
      "contexts",
      "decoder/gamma",
      "decoder/query_feat/embedding",
      "decoder/query_embed/embedding",
      "pixel_decoder/level_embed",
      "pixel_decoder/input_proj_0/gn/scale",
      "pixel_decoder/encoder/layers_0/self_attn_layer_norm/scale",
      "decoder/decoder_norm/scale",
      "text_encoder/token_embedding/embedding",
      "text_encoder/positional_embedding",
  ]:
    assert p in no_decay, p
  for p in [
      "backbone/conv1/kernel",
      "decoder/class_embed/kernel",
      "pixel_decoder/encoder/layers_0/fc1/kernel",
      "pixel_decoder/encoder/layers_0/fc1/bias",
  ]:
    assert p not in no_decay, p


def test_frozen_parameters_are_left_out():
  trainable, frozen = optim.split_trainable(FAKE_PARAMS, cfg())
  assert set(frozen) == {p for p in optim.flatten(FAKE_PARAMS) if p.startswith("text_")}
  assert "contexts" in trainable


@pytest.mark.parity
def test_adamw_equals_torch_per_group():
  import torch

  rng = np.random.default_rng(0)
  params = {
      "backbone/w": rng.normal(size=(3, 4)).astype(np.float32),
      "decoder/norm/scale": rng.normal(size=(4,)).astype(np.float32),
      "decoder/w": rng.normal(size=(4, 2)).astype(np.float32),
  }
  grads = [
      {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(5)
  ]
  c = cfg(
      clip_norm=0.0,
      warmup_steps=0,
      lr=1e-2,
      total_steps=5,
      poly_power=1.0,
      lr_mult_rules=[["^backbone/", 0.1]],
  )
  tx = optim.make_optimizer(c)
  p = {k: jnp.asarray(v) for k, v in params.items()}
  state = tx.init(p)
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  topt = torch.optim.AdamW(
      [
          {"params": [tp["backbone/w"]], "lr": 1e-3, "weight_decay": 0.02},
          {"params": [tp["decoder/norm/scale"]], "lr": 1e-2, "weight_decay": 0.0},
          {"params": [tp["decoder/w"]], "lr": 1e-2, "weight_decay": 0.02},
      ],
      betas=(0.9, 0.999),
      eps=1e-8,
  )
  sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: (1 - s / 5))
  for g in grads:
    u, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, u)
    for k in tp:
      tp[k].grad = torch.tensor(g[k])
    topt.step()
    sched.step()
  for k in params:  # tolerance: fp32, 1e-6 absolute on O(1) parameters
    np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), atol=1e-6)


def test_clipping_uses_trainable_grads_only():
  c = cfg(clip_norm=0.01, warmup_steps=0, lr=1.0)
  tx = optim.make_optimizer(c)
  p = {"decoder/w": jnp.ones((2,))}
  u, _ = tx.update({"decoder/w": jnp.array([3.0, 4.0])}, tx.init(p), p)
  assert np.all(np.isfinite(np.asarray(u["decoder/w"])))


@pytest.mark.parametrize("backbone", ["RN50", "ViT-B/16"])
def test_rules_on_the_real_model(backbone):
  """Every norm, embedding and query parameter of the real model gets no decay;
  every kernel gets decay; only the text tower and the image tower's unread
  image-level head are frozen."""
  c = recipes.paper_config("ade20k", backbone)
  model = mtaclip.build_model(c.model)
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((151, 5), jnp.int32)
      )
  )
  groups = optim.describe_rules(shapes["params"], c.optim)
  for name, paths in sorted(groups.items()):
    print(f"{name}: {len(paths)} parameters")
  no_decay, decay = set(groups["no decay"]), set(groups["decay"])
  for p in decay:
    assert not re.search(r"(norm|ln_|bn\d|embed|queries|gamma|contexts)", p), p
  for p in no_decay:
    assert not p.endswith("kernel"), p
  for p in decay:  # in flax only norm layers have a "scale"
    assert not p.endswith("/scale"), p
  assert {
      "decoder/queries_features",
      "decoder/queries_embedder",
      "decoder/level_embed",
      "decoder/gamma",
      "contexts",
      "pixel_decoder/level_embed",
  } <= no_decay
  heads = {"RN50": "backbone/attnpool/", "ViT-B/16": "backbone/(ln_post|proj)"}[backbone]
  assert all(re.match(f"text_encoder/|{heads}", p) for p in groups["lr x0"])
  assert any(re.match(heads, p) for p in groups["lr x0"])  # segmentation never reads it
  assert all(p.startswith("backbone/") for p in groups["lr x0.1"])
