"""Tests of mtaclip_jax.losses: parity with transformers' Mask2FormerLoss, the
similarity loss against a transcription of the paper's equations, gradients, and
the sharded loss on 8 fake CPU devices."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtaclip_jax.objective import losses
from mtaclip_jax.objective.matching import hungarian
from tests import train_fixtures

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def loss_config(**overrides):
  c = dict(
      class_weight=2.0,
      mask_weight=5.0,
      dice_weight=5.0,
      sim_weight=1.0,
      no_object_weight=0.1,
      num_points=300,
      oversample_ratio=3.0,
      importance_sample_ratio=0.75,
      similarity=True,
      neg="mix",
      tau=1.0,
  )
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def make_problem(
    seed, layers=2, b=2, q=10, t=5, c=7, h=16, big=64, k=3, d=8, all_valid=False, factored=False
):
  """Random outputs and batch; `factored`: masks made as the model makes them, with
  their factors mask_embed / mask_features in the outputs."""
  rng = np.random.default_rng(seed)
  outputs = {
      "logits": rng.normal(size=(layers, b, q, c + 1)).astype(np.float32),
      "masks": (3 * rng.normal(size=(layers, b, q, h, h))).astype(np.float32),
  }
  if factored:
    outputs["mask_embed"] = rng.normal(size=(layers, b, q, 6)).astype(np.float32)
    outputs["mask_features"] = rng.normal(size=(b, h, h, 6)).astype(np.float32)
    outputs["masks"] = np.einsum(
        "lbqc,bhwc->lbqhw", outputs["mask_embed"], outputs["mask_features"]
    ).astype(np.float32)
  m = rng.normal(size=(layers, b, q, d))
  tt = rng.normal(size=(layers, b, k, c + 1, d))
  outputs["m_proj"] = (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)
  outputs["t_proj"] = (tt / np.linalg.norm(tt, axis=-1, keepdims=True)).astype(np.float32)
  blocks = rng.random((b, t, big // 8, big // 8)) < 0.4
  valid = np.ones((b, t), bool) if all_valid else rng.random((b, t)) < 0.7
  valid[:, 0] = True
  batch = {
      "masks": np.repeat(np.repeat(blocks, 8, axis=2), 8, axis=3).astype(np.uint8),
      "classes": np.where(valid, rng.integers(0, c, size=(b, t)), 255).astype(np.int32),
      "valid": valid,
  }
  return outputs, batch


# ---------------------------------------------------------------- Mask2Former terms


@pytest.mark.parity
@pytest.mark.slow
def test_equals_transformers_mask2former_loss(monkeypatch):
  import torch
  from transformers import Mask2FormerConfig
  from transformers.models.mask2former import modeling_mask2former as hf

  cfg = loss_config()
  num_classes = 7
  outputs, batch = make_problem(0, c=num_classes)
  layers, b, q = outputs["logits"].shape[:3]
  t = batch["valid"].shape[1]
  points = jax.tree.map(np.asarray, losses.draw_points(jax.random.key(1), layers, b, t, cfg))
  loss, metrics = jax.jit(
      lambda o, bt, p: losses.compute_loss(o, bt, jax.random.key(0), cfg, num_classes, points=p)
  )(outputs, batch, points)
  indices = np.asarray(
      jax.jit(lambda o, bt, p: hungarian.match(o, bt, p, cfg))(outputs, batch, points["match"])
  )

  hf_config = Mask2FormerConfig(
      num_labels=num_classes,
      train_num_points=cfg.num_points,
      oversample_ratio=cfg.oversample_ratio,
      importance_sample_ratio=cfg.importance_sample_ratio,
      no_object_weight=cfg.no_object_weight,
  )
  criterion = hf.Mask2FormerLoss(hf_config, weight_dict={})
  cols = [np.flatnonzero(v) for v in batch["valid"]]
  mask_labels = [torch.from_numpy(batch["masks"][i][cols[i]]).float() for i in range(b)]
  class_labels = [torch.from_numpy(batch["classes"][i][cols[i]]).long() for i in range(b)]
  ref = {"loss_cross_entropy": [], "loss_mask": [], "loss_dice": []}
  for layer in range(layers):
    # transformers draws: the matcher's points per image, then the candidates and
    # the uniform points of the matched pairs, ordered by image then query.
    pairs = [sorted((indices[layer, i, tgt], tgt) for tgt in cols[i]) for i in range(b)]
    draws = [torch.from_numpy(points["match"][layer, i][None]) for i in range(b)]
    for key in ("over", "random"):
      draws.append(
          torch.from_numpy(
              np.stack([points[key][layer, i, tgt] for i in range(b) for _, tgt in pairs[i]])
          )
      )

    def fake_rand(*shape, **kwargs):
      out = draws.pop(0)
      assert tuple(out.shape) == tuple(shape), (out.shape, shape)
      return out

    monkeypatch.setattr(torch, "rand", fake_rand)
    got = criterion(
        torch.from_numpy(outputs["masks"][layer]),
        torch.from_numpy(outputs["logits"][layer]),
        mask_labels,
        class_labels,
    )
    monkeypatch.undo()
    assert not draws
    for name in ref:
      ref[name].append(float(got[name]))
  names = {"loss_ce": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
  for ours, theirs in names.items():
    np.testing.assert_allclose(float(metrics[ours]), sum(ref[theirs]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[ours + "_last"]), ref[theirs][-1], rtol=1e-5)
  expected = (
      2 * sum(ref["loss_cross_entropy"])
      + 5 * sum(ref["loss_mask"])
      + 5 * sum(ref["loss_dice"])
      + float(metrics["loss_sim"])
  )
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


_JITTED = {}


def jit_loss(cfg, num_classes=7):
  """compute_loss with given points, jitted once per configuration."""
  key = (tuple(sorted(cfg.items())), num_classes)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(
        lambda o, bt, p: losses.compute_loss(o, bt, None, cfg, num_classes, points=p)
    )
  return _JITTED[key]


def test_batch_without_segments_gives_finite_loss():
  """No valid segment anywhere: the count clamps to 1, mask terms are 0, every
  query's class target is "none" (the normalisation itself is checked against
  transformers, and across devices by the sharded test)."""
  cfg = loss_config(similarity=False)
  outputs, batch = make_problem(2)
  points = losses.draw_points(jax.random.key(3), 2, 2, 5, cfg)
  empty = dict(batch, valid=np.zeros_like(batch["valid"]))
  loss, metrics = jit_loss(cfg)(outputs, empty, points)
  assert float(metrics["loss_mask"]) == 0.0 and float(metrics["loss_dice"]) == 0.0
  logp = jax.nn.log_softmax(outputs["logits"], -1)[..., -1]
  np.testing.assert_allclose(
      float(metrics["loss_ce"]), float(-logp.mean(axis=(1, 2)).sum()), rtol=1e-6
  )
  np.testing.assert_allclose(float(loss), 2 * float(metrics["loss_ce"]), rtol=1e-6)


def test_rejects_wrong_number_of_classes():
  outputs, batch = make_problem(0)
  with pytest.raises(ValueError, match="num_classes"):
    losses.compute_loss(outputs, batch, jax.random.key(0), loss_config(), 9)


# ---------------------------------------------------------------- similarity loss


def paper_similarity(m, t, target, weights, neg, tau):
  """Direct transcription of MTA-CLIP Eq. 8 (MixNeg) / Eq. 9 (SeparateNeg), with
  the "none" class counted among the C+1 classes, and a weighted mean over queries."""
  layers, b, q, _ = m.shape
  k_num, c_num = t.shape[2], t.shape[3]
  out = []
  for l in range(layers):
    num = den = 0.0
    for i in range(b):
      for n in range(q):
        s = lambda r, k: float(m[l, i, n] @ t[l, i, k, r]) / tau  # noqa: E731
        j = target[l, i, n]
        k_pos = max(range(k_num), key=lambda k: s(j, k))
        pos = np.exp(s(j, k_pos))
        if neg == "mix":
          negs = sum(
              np.exp(s(r, k)) for r in range(c_num) for k in range(k_num) if (r, k) != (j, k_pos)
          )
        else:
          negs = sum(np.exp(s(r, k)) for r in range(c_num) for k in range(k_num) if r != j)
        num += weights[l, i, n] * -np.log(pos / (pos + negs))
        den += weights[l, i, n]
    out.append(num / den)
  return np.array(out)


@pytest.mark.parametrize("neg", ["mix", "separate"])
@pytest.mark.parametrize("k", [1, 3])
def test_similarity_equals_paper_equations(neg, k):
  rng = np.random.default_rng(5)
  layers, b, q, c1, d, tau = 2, 2, 4, 5, 6, 0.5
  m = rng.normal(size=(layers, b, q, d)).astype(np.float32)
  t = rng.normal(size=(layers, b, k, c1, d)).astype(np.float32)
  target = rng.integers(0, c1, size=(layers, b, q))
  target[0, 0, 0] = c1 - 1  # "none"
  weights = np.where(target == c1 - 1, 0.1, 1.0).astype(np.float32)
  got = losses.similarity_loss(
      jnp.asarray(m), jnp.asarray(t), jnp.asarray(target), jnp.asarray(weights), neg=neg, tau=tau
  )
  ref = paper_similarity(m.astype(np.float64), t.astype(np.float64), target, weights, neg, tau)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_similarity_k1_mix_equals_separate_and_k3_differs():
  rng = np.random.default_rng(6)
  target = jnp.asarray(rng.integers(0, 5, size=(2, 2, 4)))
  weights = jnp.where(target == 4, 0.1, 1.0)
  for k in (1, 3):
    m = jnp.asarray(rng.normal(size=(2, 2, 4, 6)).astype(np.float32))
    t = jnp.asarray(rng.normal(size=(2, 2, k, 5, 6)).astype(np.float32))
    mix = losses.similarity_loss(m, t, target, weights, neg="mix")
    sep = losses.similarity_loss(m, t, target, weights, neg="separate")
    if k == 1:
      np.testing.assert_allclose(np.asarray(mix), np.asarray(sep), rtol=1e-6)
    else:
      assert np.all(np.asarray(sep) < np.asarray(mix))  # fewer negatives


def test_similarity_uses_matched_classes_and_none():
  """loss_sim of compute_loss == the paper formula on the matcher's targets."""
  cfg = loss_config()
  outputs, batch = make_problem(7)
  points = losses.draw_points(jax.random.key(0), 2, 2, 5, cfg)
  _, metrics = jit_loss(cfg)(outputs, batch, points)
  indices = hungarian.match(outputs, batch, points["match"], cfg)
  target, matched = losses.query_targets(
      indices, jnp.asarray(batch["classes"]), jnp.asarray(batch["valid"]), 10, 7
  )
  assert int(matched.sum()) == 2 * int(batch["valid"].sum())
  weights = np.where(np.asarray(matched), 1.0, 0.1)
  ref = paper_similarity(
      outputs["m_proj"].astype(np.float64),
      outputs["t_proj"].astype(np.float64),
      np.asarray(target),
      weights,
      "mix",
      1.0,
  )
  np.testing.assert_allclose(float(metrics["loss_sim"]), ref.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_sim_last"]), ref[-1], rtol=1e-5)


def test_no_similarity_term_for_baseline_or_when_disabled():
  outputs, batch = make_problem(8)
  base = {k: outputs[k] for k in ("logits", "masks")}  # Mask2Former baseline
  cfg = loss_config()
  points = losses.draw_points(jax.random.key(0), 2, 2, 5, cfg)
  loss_b, m_b = jit_loss(cfg)(base, batch, points)
  loss_d, m_d = jit_loss(loss_config(similarity=False))(outputs, batch, points)
  loss_s, m_s = jit_loss(cfg)(outputs, batch, points)
  assert "loss_sim" not in m_b and "loss_sim" not in m_d and "loss_sim" in m_s
  np.testing.assert_allclose(float(loss_b), float(loss_d), rtol=1e-6)
  np.testing.assert_allclose(float(loss_s), float(loss_b) + float(m_s["loss_sim"]), rtol=1e-6)


# ---------------------------------------------------------------- gradients


def test_value_and_grad_jit_finite_and_reaches_every_output():
  outputs, batch = make_problem(9)
  cfg = loss_config(neg="separate")
  fn = jax.jit(
      jax.value_and_grad(lambda o, bt, key: losses.compute_loss(o, bt, key, cfg, 7), has_aux=True)
  )
  (loss, metrics), grads = fn(outputs, batch, jax.random.key(0))
  assert np.isfinite(float(loss))
  assert set(metrics) >= {
      "loss_ce",
      "loss_mask",
      "loss_dice",
      "loss_sim",
      "total",
      "loss_ce_last",
      "loss_sim_last",
  }
  np.testing.assert_allclose(float(metrics["total"]), float(loss))
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).sum() > 0, name
  # every layer is supervised
  assert np.all(np.abs(grads["masks"]).sum(axis=(1, 2, 3, 4)) > 0)
  assert np.all(np.abs(grads["t_proj"]).sum(axis=(1, 2, 3, 4)) > 0)
  # a different key draws different points
  (loss2, _), _ = fn(outputs, batch, jax.random.key(1))
  assert float(loss2) != float(loss)


def test_factored_masks_give_the_gradient_of_autodiff_through_the_masks():
  """The model's outputs carry mask_embed / mask_features (masks = their einsum); the
  mask losses then differentiate those directly, matched queries only. Same loss
  and same gradients as differentiating `masks` and chaining through the einsum."""
  outputs, batch = make_problem(11, factored=True)
  cfg = loss_config()
  factors = ("mask_embed", "mask_features")
  made = lambda o: jnp.einsum("lbqc,bhwc->lbqhw", o["mask_embed"], o["mask_features"])

  def dense(o):
    rest = {k: v for k, v in o.items() if k not in factors}
    return losses.compute_loss(dict(rest, masks=made(o)), batch, jax.random.key(3), cfg, 7)[0]

  def factored(o):
    return losses.compute_loss(dict(o, masks=made(o)), batch, jax.random.key(3), cfg, 7)[0]

  want, g_want = jax.jit(jax.value_and_grad(dense))(outputs)
  got, g_got = jax.jit(jax.value_and_grad(factored))(outputs)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for name in g_want:  # fp32, sums in another order
    ref = np.asarray(g_want[name])
    np.testing.assert_allclose(
        np.asarray(g_got[name]), ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=name
    )
    assert np.abs(ref).max() > 0 or name == "masks", name


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tests.parity.test_losses import make_problem, loss_config
    from mtaclip_jax.objective import losses
    assert jax.device_count() == 8
    outputs, batch = make_problem(0, b=8)
    cfg = loss_config()
    fn = lambda o, bt, key: losses.compute_loss(o, bt, key, cfg, 7)
    vg = jax.value_and_grad(fn, has_aux=True)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_s = {k: NamedSharding(mesh, P("data")) for k in batch}
    # Plain outputs, then the model's (with the masks' factors: mask_features is
    # [B, h, w, E], batch-first).
    for outputs in (outputs, make_problem(0, b=8, factored=True)[0]):
        (ref_loss, ref_m), ref_g = jax.jit(vg)(outputs, batch, jax.random.key(0))
        out_s = {k: NamedSharding(mesh, P("data") if k == "mask_features" else P(None, "data"))
                 for k in outputs}
        with jax.set_mesh(mesh):
            step = jax.jit(vg, in_shardings=(out_s, batch_s, None), out_shardings=None)
            args = (jax.device_put(outputs, out_s), jax.device_put(batch, batch_s),
                    jax.random.key(0))
            compiled = step.lower(*args).compile()
            (loss, m), g = compiled(*args)
        # per-image work stays on its device: only scalar sums cross devices
        assert "all-gather" not in compiled.as_text() and "all-to-all" not in compiled.as_text()
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        for k in ref_m:
            np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-5, err_msg=k)
        for k in ref_g:
            assert np.all(np.isfinite(np.asarray(g[k])))
            np.testing.assert_allclose(np.asarray(g[k]), np.asarray(ref_g[k]), rtol=1e-4,
                                       atol=1e-7 * max(1.0, np.abs(ref_g[k]).max()), err_msg=k)
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_sharded_loss_equals_unsharded_on_8_fake_devices():
  # Small shapes for CI time; ADE20k shapes (L=9, B=8, Q=100, T=30, 128x128 masks,
  # C=150, D=1024) ran by hand on 8 fake devices: 21 s, finite gradients (needs
  # matching's chunked callbacks on CPU, see host._CPU_CALLBACK_BYTES).
  root = train_fixtures.ROOT
  env = train_fixtures.fake_devices_env(8)
  proc = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT],
      env=env,
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr
