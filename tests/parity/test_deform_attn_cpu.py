"""Fused CPU deformable attention kernel vs the gather impl and transformers."""

import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: E402  (a test dependency: never skipped)
from transformers.models.mask2former import modeling_mask2former as m2f  # noqa: E402

from mtaclip_jax.models.ops import deform_attn
from mtaclip_jax.models.ops import deform_attn_cpu

SHAPES = ((6, 9), (3, 5), (2, 2))
B, LQ, HEADS, POINTS, DH = 2, 13, 4, 3, 8


def make_inputs(seed, borders=True):
  rng = np.random.default_rng(seed)
  nl = len(SHAPES)
  s = sum(h * w for h, w in SHAPES)
  value = rng.standard_normal((B, s, HEADS, DH)).astype(np.float32)
  # [-0.3, 1.3]: many samples fall partly or wholly outside their map.
  loc = rng.uniform(-0.3, 1.3, (B, LQ, HEADS, nl, POINTS, 2)).astype(np.float32)
  if borders:
    # Queries 0-3: pixel centres (integer pixel coordinate, where floor()
    # switches corners), pixel edges, and the map's own edges 0 and 1.
    for l, (h, w) in enumerate(SHAPES):
      for axis, size in ((0, w), (1, h)):
        k = rng.integers(-1, size + 1, (B, HEADS, POINTS))
        loc[:, 0, :, l, :, axis] = (k + 0.5) / size
        loc[:, 1, :, l, :, axis] = k / size
        loc[:, 2, :, l, :, axis] = 0.0
        loc[:, 3, :, l, :, axis] = 1.0
  attn = rng.random((B, LQ, HEADS, nl, POINTS)).astype(np.float32)
  attn /= attn.sum((-1, -2), keepdims=True)
  cot = rng.standard_normal((B, LQ, HEADS * DH)).astype(np.float32)
  return value, loc, attn, cot


def value_and_grads(impl, value, loc, attn, cot):
  def f(v, l, a):
    out = impl(v, SHAPES, l, a)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(value, loc, attn)


def assert_close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, what
  # fp32: 1e-5 absolute, relative to the largest entry where entries are big.
  err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
  assert err <= 1e-5, (what, err)


@pytest.fixture(scope="module")
def results():
  inputs = make_inputs(0)
  return {name: value_and_grads(deform_attn.IMPLS[name], *inputs) for name in ("gather", "cpu")}


def test_forward_matches_gather(results):
  out_cpu = results["cpu"][0][1]
  assert out_cpu.shape == (B, LQ, HEADS * DH) and out_cpu.dtype == jnp.float32
  assert_close(out_cpu, results["gather"][0][1], "out")


@pytest.mark.parametrize(
    "i,name", [(0, "d_value"), (1, "d_sampling_locations"), (2, "d_attention_weights")]
)
def test_gradients_match_gather(results, i, name):
  got, want = results["cpu"][1][i], results["gather"][1][i]
  assert np.abs(want).max() > 0.1, name  # the test data exercise this gradient
  assert_close(got, want, name)


def test_bf16_value():
  value, loc, attn, cot = make_inputs(1, borders=False)
  value = jnp.asarray(value, jnp.bfloat16)
  (_, out), grads = value_and_grads(deform_attn.IMPLS["cpu"], value, loc, attn, cot)
  (_, ref), _ = value_and_grads(deform_attn.ms_deform_attn_gather, value, loc, attn, cot)
  assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def test_module_matches_gather():
  shapes = ((4, 4), (2, 2))
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 20, 32)), jnp.float32)
  ref = jnp.asarray(rng.random((1, 20, 2, 2)), jnp.float32)
  mods = {
      impl: deform_attn.MSDeformAttn(d_model=32, n_heads=4, n_levels=2, n_points=3, impl=impl)
      for impl in ("gather", "cpu")
  }
  params = mods["gather"].init(jax.random.PRNGKey(0), q, ref, q, shapes)
  # Non-zero offset/weight kernels, so gradients reach them.
  params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)
  outs = {}
  for impl, mod in mods.items():
    loss = lambda p, m=mod: jnp.sum(m.apply(p, q, ref, q, shapes) ** 2)
    outs[impl] = jax.jit(jax.value_and_grad(loss))(params)
  assert_close(outs["cpu"][0], outs["gather"][0], "loss")
  jax.tree.map(lambda a, b: assert_close(a, b, "param grad"), outs["cpu"][1], outs["gather"][1])


def test_auto_picks_kernel_on_one_cpu_device(monkeypatch):
  assert jax.default_backend() == "cpu" and jax.device_count() == 1
  value, loc, attn, _ = make_inputs(3)
  auto = jax.jit(deform_attn.get_impl("auto"), static_argnums=1)
  assert deform_attn_cpu.FORWARD_TARGET in auto.lower(value, SHAPES, loc, attn).as_text()
  # Several devices: a custom call cannot be partitioned, "auto" keeps the gather.
  monkeypatch.setattr(jax, "device_count", lambda *a: 8)
  assert not deform_attn_cpu.use_kernel()
  # A fresh function: jit caches traces per function, and "auto" decides at trace time.
  hlo = (
      jax.jit(lambda *a: deform_attn.get_impl("auto")(*a), static_argnums=1)
      .lower(value, SHAPES, loc, attn)
      .as_text()
  )
  assert deform_attn_cpu.FORWARD_TARGET not in hlo


@pytest.mark.parametrize(
    "compiler,reason",
    [
        ("/nonexistent/g++", "cannot run"),
        ("false", "failed on"),  # runs, exits 1
    ],
)
def test_build_failure_falls_back(monkeypatch, tmp_path, compiler, reason):
  monkeypatch.setattr(deform_attn_cpu, "_STATE", {})
  monkeypatch.setattr(deform_attn_cpu, "COMPILER", compiler)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  value, loc, attn, _ = make_inputs(4, borders=False)
  with pytest.warns(RuntimeWarning, match=f"unavailable, using 'gather': .*{reason}"):
    out = deform_attn.get_impl("auto")(value, SHAPES, loc, attn)
  np.testing.assert_array_equal(out, deform_attn.ms_deform_attn_gather(value, SHAPES, loc, attn))
  with pytest.raises(RuntimeError, match=f"deform_attn_impl 'cpu'.*{reason}"):
    deform_attn.get_impl("cpu")(value, SHAPES, loc, attn)
  assert list(tmp_path.rglob("*")) == [tmp_path / "mtaclip_jax"]  # no temp files left


def test_a_new_build_prunes_builds_unused_for_a_month(monkeypatch, tmp_path):
  # _load builds into a fresh cache; the FFI targets are registered already.
  monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *a, **k: None)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  cache = tmp_path / "mtaclip_jax"
  cache.mkdir()
  month = deform_attn_cpu.PRUNE_DAYS * 86400
  stale, recent, other = (
      cache / "ms_deform_attn_cpu-old.so",
      cache / "ms_deform_attn_cpu-recent.so",
      cache / "notes.txt",
  )
  for f in (stale, recent, other):
    f.write_bytes(b"x")
  os.utime(stale, (time.time() - month - 60,) * 2)
  os.utime(recent, (time.time() - month + 3600,) * 2)
  os.utime(other, (time.time() - 2 * month,) * 2)
  ok, built = deform_attn_cpu._load()
  assert ok, built
  assert sorted(cache.iterdir()) == sorted([pathlib.Path(built), recent, other])
  # Loading an existing build marks it as used, so other versions' builds keep it.
  os.utime(built, (time.time() - 2 * month,) * 2)
  assert deform_attn_cpu._load() == (True, built)
  assert os.stat(built).st_mtime > time.time() - 60


def test_library_keyed_by_cpu_and_compiler(monkeypatch):
  path = deform_attn_cpu.library_path()
  assert path.exists()  # built by the tests above, in the user cache
  monkeypatch.setattr(deform_attn_cpu, "_cpu_flags", lambda: "flags : fpu sse2")
  assert deform_attn_cpu.library_path() != path
  monkeypatch.undo()
  monkeypatch.setattr(deform_attn_cpu, "COMPILER", "clang++")
  assert deform_attn_cpu.library_path() != path


def test_mismatched_shapes_name_the_inputs():
  value, loc, attn, _ = make_inputs(5, borders=False)
  with pytest.raises(ValueError, match="spatial_shapes"):
    deform_attn_cpu.ms_deform_attn_cpu(value, ((6, 9), (3, 5), (2, 3)), loc, attn)
  with pytest.raises(ValueError, match="attention_weights"):
    deform_attn_cpu.ms_deform_attn_cpu(value, SHAPES, loc, attn[..., :2])


@pytest.mark.parity
@pytest.mark.parametrize("impl", ["gather", "cpu"])
def test_matches_transformers_with_gradients(impl):
  value, loc, attn, cot = make_inputs(6, borders=False)
  tv, tl, ta = (torch.from_numpy(x).requires_grad_() for x in (value, loc, attn))
  ref = m2f.multi_scale_deformable_attention(tv, list(SHAPES), tl, ta)
  (ref * torch.from_numpy(cot)).sum().backward()
  (_, out), grads = value_and_grads(deform_attn.IMPLS[impl], value, loc, attn, cot)
  assert_close(out, ref.detach().numpy(), "out")
  for got, want, name in zip(grads, (tv, tl, ta), ("d_value", "d_loc", "d_attn")):
    assert_close(got, want.grad.numpy(), name)
