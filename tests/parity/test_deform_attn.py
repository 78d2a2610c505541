"""Deformable attention core vs transformers' PyTorch reference; module init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: E402  (a test dependency: never skipped)
from transformers.models.mask2former import modeling_mask2former as m2f  # noqa: E402

from mtaclip_jax.models.ops import deform_attn


@pytest.mark.parity
@pytest.mark.parametrize(
    "shapes,heads,points,dh",
    [
        (((7, 5), (4, 3), (2, 2)), 8, 4, 32),
        (((9, 9), (3, 6)), 2, 3, 16),
        (((1, 1),), 1, 1, 8),
        (((16, 16), (8, 8), (4, 4), (2, 2)), 4, 2, 8),
    ],
)
def test_core_matches_transformers(shapes, heads, points, dh):
  rng = np.random.default_rng(0)
  b, lq, nl = 2, 11, len(shapes)
  s = sum(h * w for h, w in shapes)
  value = rng.standard_normal((b, s, heads, dh)).astype(np.float32)
  # Locations in [-0.3, 1.3]: many samples fall partly or wholly outside.
  loc = rng.uniform(-0.3, 1.3, (b, lq, heads, nl, points, 2)).astype(np.float32)
  attn = rng.random((b, lq, heads, nl, points)).astype(np.float32)
  attn /= attn.sum((-1, -2), keepdims=True)
  ref = m2f.multi_scale_deformable_attention(
      torch.from_numpy(value), list(shapes), torch.from_numpy(loc), torch.from_numpy(attn)
  ).numpy()
  out = np.asarray(
      jax.jit(deform_attn.ms_deform_attn_gather, static_argnums=1)(value, shapes, loc, attn)
  )
  assert out.shape == (b, lq, heads * dh)
  # fp32, relative to the output scale: <= 1e-5.
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert err <= 1e-5, err


def test_outside_samples_are_zero():
  value = jnp.ones((1, 4, 1, 2))
  loc = jnp.full((1, 1, 1, 1, 1, 2), 2.0)  # far outside the 2x2 map
  out = deform_attn.ms_deform_attn_gather(value, ((2, 2),), loc, jnp.ones((1, 1, 1, 1, 1)))
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  # Exactly on the border pixel-centre edge: half the bilinear mass is outside.
  loc = jnp.asarray([1.0, 0.25]).reshape(1, 1, 1, 1, 1, 2)
  out = deform_attn.ms_deform_attn_gather(value, ((2, 2),), loc, jnp.ones((1, 1, 1, 1, 1)))
  np.testing.assert_allclose(np.asarray(out), 0.5, rtol=1e-6)


def test_module_init_matches_deformable_detr():
  mod = deform_attn.MSDeformAttn(d_model=32, n_heads=4, n_levels=2, n_points=3)
  shapes = ((4, 4), (2, 2))
  q = jnp.zeros((1, 20, 32))
  ref = jnp.full((1, 20, 2, 2), 0.5)
  params = mod.init(jax.random.PRNGKey(0), q, ref, q, shapes)["params"]
  bias = np.asarray(params["sampling_offsets"]["bias"]).reshape(4, 2, 3, 2)
  # Head 0 points along +x, head 1 along +y; point p is p+1 steps away.
  np.testing.assert_allclose(bias[0, 0, :, 0], [1, 2, 3], atol=1e-6)
  np.testing.assert_allclose(bias[1, 1, :, 1], [1, 2, 3], atol=1e-6)
  np.testing.assert_allclose(bias[1, 1, :, 0], 0, atol=1e-6)
  assert not np.any(np.asarray(params["attention_weights"]["kernel"]))
  assert not np.any(np.asarray(params["attention_weights"]["bias"]))
  assert not np.any(np.asarray(params["sampling_offsets"]["kernel"]))
  with pytest.raises(ValueError, match="deform_attn_impl"):
    deform_attn.get_impl("nope")


def test_gather_gradients_with_bf16_value():
  """bf16 values: the gradient comes back bf16 and equals the fp32 one to bf16
  rounding (the scatter-add itself accumulates in fp32)."""
  rng = np.random.default_rng(3)
  shapes = ((6, 9), (3, 5))
  s = sum(h * w for h, w in shapes)
  value = rng.standard_normal((2, s, 4, 8)).astype(np.float32)
  loc = rng.uniform(-0.2, 1.2, (2, 7, 4, 2, 3, 2)).astype(np.float32)
  attn = rng.random((2, 7, 4, 2, 3)).astype(np.float32)
  cot = rng.standard_normal((2, 7, 32)).astype(np.float32)

  def grads(v):
    f = lambda v, l, a: jnp.sum(
        deform_attn.ms_deform_attn_gather(v, shapes, l, a).astype(jnp.float32) * cot
    )
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(v, loc, attn)

  want = grads(jnp.asarray(value))
  got = grads(jnp.asarray(value, jnp.bfloat16))
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    # bf16 inputs/outputs: 8 mantissa bits, 2e-2 of the largest entry.
    assert np.abs(g - w).max() <= 2e-2 * np.abs(w).max()
