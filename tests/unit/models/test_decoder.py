"""Mask-Text decoder behaviour: masked attention, text queries, projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtaclip_jax.models import decoder
from mtaclip_jax.models.decoder import Attention
from mtaclip_jax.models.decoder import MaskTextDecoder
from mtaclip_jax.models.decoder import attention_blocked
from mtaclip_jax.models.pixel_decoder import resize_bilinear

C, K, D, HID = 4, 2, 32, 64


def _inputs(key, b=2):
  k1, k2, k3 = jax.random.split(key, 3)
  sizes = [(2, 3), (4, 6), (8, 12)]
  ms = [jax.random.normal(k, (b, h, w, HID)) for k, (h, w) in zip(jax.random.split(k1, 3), sizes)]
  mf = jax.random.normal(k2, (b, 16, 24, HID))
  t0 = jax.random.normal(k3, (K, C + 1, D))
  return ms, mf, t0


def _decoder(**kw):
  args = dict(
      num_classes=C,
      num_queries=10,
      hidden_dim=HID,
      mask_dim=HID,
      num_heads=4,
      ffn_dim=128,
      num_layers=3,
      embed_dim=D,
      num_contexts=K,
  )
  args.update(kw)
  return MaskTextDecoder(**args)


@pytest.fixture(scope="module")
def setup():
  ms, mf, t0 = _inputs(jax.random.PRNGKey(0))
  dec = _decoder()
  params = dec.init(jax.random.PRNGKey(1), ms, mf, t0)["params"]
  return dec, params, ms, mf, t0


def test_blocked_key_gets_zero_weight():
  attn = Attention(embed_dim=16, num_heads=2)
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 16))
  kv = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 16))
  blocked = jnp.zeros((1, 3, 5), bool).at[:, :, 2].set(True)
  params = attn.init(jax.random.PRNGKey(2), q, kv, kv, blocked)
  out = attn.apply(params, q, kv, kv, blocked)
  kv2 = kv.at[:, 2].add(100.0)  # change only the blocked key/value
  np.testing.assert_allclose(attn.apply(params, q, kv2, kv2, blocked), out, atol=1e-6)
  kv3 = kv.at[:, 1].add(1.0)
  assert np.abs(attn.apply(params, q, kv3, kv3, blocked) - out).max() > 1e-3


def test_attention_blocked_mask():
  masks = jnp.full((1, 3, 8, 8), -5.0)
  masks = masks.at[0, 0, :4, :4].set(5.0)  # query 0: top-left quarter
  masks = masks.at[0, 2].set(5.0)  # query 2: everywhere; query 1: nowhere
  blocked = np.asarray(attention_blocked(masks, (2, 2)))
  assert blocked.shape == (1, 3, 4)
  np.testing.assert_array_equal(blocked[0, 0], [False, True, True, True])
  np.testing.assert_array_equal(blocked[0, 1], [False] * 4)  # fully blocked -> unblocked
  np.testing.assert_array_equal(blocked[0, 2], [False] * 4)


def test_text_query_masks_at_the_level_size_equal_resized_masks():
  # The decoder makes the text queries' masks from the mask features resized to the
  # level (resize(e . F) = e . resize(F)) instead of resizing stride-4 masks.
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  embed = jax.random.normal(k1, (2, 40, HID)) / 8
  feats = jax.random.normal(k2, (2, 64, 96, HID))
  for size in [(8, 12), (16, 24), (32, 48)]:
    full = jnp.einsum("bqc,bhwc->bqhw", embed, feats)
    want = jnp.moveaxis(resize_bilinear(jnp.moveaxis(full, 1, -1), size), -1, 1)
    got = jnp.einsum("bqc,bhwc->bqhw", embed, resize_bilinear(feats, size))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    same = np.asarray(attention_blocked(full, size) == attention_blocked(got, size))
    assert same.mean() > 0.9999, size


@pytest.mark.slow
def test_outputs_and_gamma(setup):
  dec, params, ms, mf, t0 = setup
  out = dec.apply({"params": params}, ms, mf, t0)
  assert out["logits"].shape == (3, 2, 10, C + 1)
  assert out["masks"].shape == (3, 2, 10, 16, 24)
  assert out["m_proj"].shape == (3, 2, 10, D)
  assert out["t_proj"].shape == (3, 2, K, C + 1, D)
  # The masks' factors, which the losses differentiate instead of the masks.
  np.testing.assert_allclose(
      out["masks"],
      jnp.einsum("lbqc,bhwc->lbqhw", out["mask_embed"], out["mask_features"]),
      rtol=1e-5,
      atol=1e-5,
  )
  assert out["mask_features"] is mf or np.array_equal(out["mask_features"], mf)
  np.testing.assert_allclose(np.linalg.norm(out["m_proj"], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(params["gamma"]), 1e-4)
  t0n = t0 / jnp.linalg.norm(t0, axis=-1, keepdims=True)
  assert np.abs(out["t_proj"] - t0n[None, None]).max() < 1e-3
  assert params["text_pos_embed"].shape == (K * (C + 1), HID)


@pytest.mark.slow
def test_text_queries_reach_mask_queries(setup):
  dec, params, ms, mf, t0 = setup
  a = dec.apply({"params": params}, ms, mf, t0)
  b = dec.apply({"params": params}, ms, mf, t0 * -1.0)
  assert np.abs(a["logits"] - b["logits"]).max() > 1e-3
  assert np.abs(a["masks"] - b["masks"]).max() > 1e-3


@pytest.mark.slow
def test_separate_self_attention(setup):
  _, params, ms, mf, t0 = setup
  dec = _decoder(joint_self_attn=False)
  a = dec.apply({"params": params}, ms, mf, t0)
  b = dec.apply({"params": params}, ms, mf, t0 * -1.0)
  np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6)
  np.testing.assert_allclose(a["masks"], b["masks"], atol=1e-5)
  # ...while the text side still sees the image (changes with the memory).
  c = dec.apply({"params": params}, [m * 2 for m in ms], mf, t0)
  assert np.abs(c["t_proj"] - a["t_proj"]).max() > 0


@pytest.mark.slow
def test_baseline_has_extra_output_and_no_text_params():
  ms, mf, _ = _inputs(jax.random.PRNGKey(0), b=1)
  dec = _decoder(text_queries=False)
  params = dec.init(jax.random.PRNGKey(1), ms, mf)["params"]
  assert not {"gamma", "text_pos_embed", "text_proj"} & set(params)
  out = dec.apply({"params": params}, ms, mf)
  assert set(out) == {"logits", "masks", "mask_embed", "mask_features"}
  assert out["logits"].shape == (4, 1, 10, C + 1)


def test_bad_text_embeddings():
  ms, mf, t0 = _inputs(jax.random.PRNGKey(0), b=1)
  with pytest.raises(ValueError, match="text_embeddings"):
    _decoder().init(jax.random.PRNGKey(1), ms, mf, t0[:, :3])


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_fused_attention_path_matches_einsums(monkeypatch, dtype, tol):
  """attention_impl="cudnn" runs jax.nn.dot_product_attention on the module's own
  projections with the block mask as a bias; here its XLA implementation stands in
  for cuDNN (GPU only): outputs and parameter gradients equal the einsum path's."""
  fused = decoder.fused_attention
  monkeypatch.setattr(
      decoder,
      "fused_attention",
      lambda q, k, v, blocked, implementation: fused(q, k, v, blocked, "xla"),
  )
  kq, kk, kb, kc = jax.random.split(jax.random.key(3), 4)
  query = jax.random.normal(kq, (2, 7, 32))
  memory = jax.random.normal(kk, (2, 11, 32))
  blocked = jax.random.bernoulli(kb, 0.6, (2, 7, 11)).at[:, :, 0].set(False)
  cot = jax.random.normal(kc, (2, 7, 32))
  params = Attention(32, 4, dtype).init(jax.random.key(0), query, memory, memory, blocked)

  def loss_and_grads(impl):
    mod = Attention(32, 4, dtype, impl)
    f = lambda p: jnp.sum(mod.apply(p, query, memory, memory, blocked).astype(jnp.float32) * cot)
    return jax.value_and_grad(f)(params)

  want, want_g = loss_and_grads("xla")
  got, got_g = loss_and_grads("cudnn")
  scale = float(jnp.abs(want)) + 1.0
  assert abs(float(got) - float(want)) <= tol * scale
  # Relative to the largest gradient entry (k_proj's bias gradient is 0 up to rounding).
  largest = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want_g))
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert float(jnp.abs(g - w).max()) <= tol * largest


def test_without_similarity_heads_the_outputs_and_the_heads_are_absent(setup):
  """similarity_heads=False (Table 3's "+ Text-Enhanced"): the text queries run as
  before, with no m_proj / t_proj and none of the similarity loss's parameters; the
  other parameters and the class and mask outputs are the full decoder's."""
  full, params, ms, mf, t0 = setup
  dec = _decoder(similarity_heads=False)
  shapes = jax.eval_shape(dec.init, jax.random.PRNGKey(1), ms, mf, t0)["params"]
  heads = {"mask_clip_proj", "text_clip_proj", "text_clip_norm", "gamma"}
  assert set(shapes) == set(params) - heads
  kept = {k: v for k, v in params.items() if k not in heads}
  out = jax.jit(dec.apply)({"params": kept}, ms, mf, t0)
  assert "m_proj" not in out and "t_proj" not in out
  want = jax.jit(full.apply)({"params": params}, ms, mf, t0)
  for key in ("logits", "masks"):
    np.testing.assert_array_equal(out[key], want[key])
