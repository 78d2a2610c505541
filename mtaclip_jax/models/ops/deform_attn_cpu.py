"""Fused CPU multi-scale deformable attention (XLA FFI custom call).

`ms_deform_attn_cpu` has the semantics of `deform_attn.ms_deform_attn_gather`
but runs `csrc/ms_deform_attn_cpu.cc`: a C++ loop over the samples, as
PyTorch's grid_sample does, instead of materialising the gathered corners
[B, H, Lq, L*P*4, Dh] and scattering them back in the backward. The source is
compiled with g++ on first use into a per-user cache
($XDG_CACHE_HOME/mtaclip_jax or ~/.cache/mtaclip_jax), one file per (source,
jaxlib, compiler, flags, CPU flags), so a home shared between machines never
loads a binary built for another CPU. Each load marks its file as used (mtime); a
new build deletes the builds nobody loaded for PRUNE_DAYS days. Without a compiler the impl is
unavailable: "cpu" raises naming why, "auto" warns once and uses "gather".
Threads: $MTACLIP_DEFORM_THREADS caps the kernel's (default: usable cores).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import subprocess
import tempfile
import time
from typing import Callable, Sequence
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SpatialShapes = Sequence[tuple[int, int]]

SOURCE = pathlib.Path(__file__).parent / "csrc" / "ms_deform_attn_cpu.cc"
COMPILER = os.environ.get("CXX", "g++")
# -ffp-contract=off: pixel = loc * size - 0.5 must round as in XLA, or floor()
# can land on the other side of a pixel border.
FLAGS = (
    "-O3",
    "-march=native",
    "-shared",
    "-fPIC",
    "-std=c++17",
    "-ffp-contract=off",
    "-fopenmp-simd",
    "-pthread",
)
FORWARD_TARGET = "mtaclip_ms_deform_attn_cpu_fwd"
BACKWARD_TARGET = "mtaclip_ms_deform_attn_cpu_bwd"

PRUNE_DAYS = 30

# The one build/load per process: {"status": (available, reason)}. Tests swap
# in a fresh dict to exercise a failing build.
_STATE: dict[str, tuple[bool, str]] = {}


def _cache_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "mtaclip_jax"


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.strip()
  except OSError:
    pass
  return ""


def library_path() -> pathlib.Path:
  """Where the compiled kernel for this source/jaxlib/compiler/CPU lives."""
  key = hashlib.sha256()
  for part in (
      SOURCE.read_bytes(),
      jaxlib.__version__.encode(),
      COMPILER.encode(),
      " ".join(FLAGS).encode(),
      _cpu_flags().encode(),
  ):
    key.update(part)
    key.update(b"\0")
  return _cache_dir() / f"ms_deform_attn_cpu-{key.hexdigest()[:20]}.so"


def _compile(target: pathlib.Path) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  # A private temp name, then an atomic rename: two processes may build at once.
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
  os.close(fd)
  try:
    cmd = [COMPILER, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
      raise RuntimeError(
          f"compiler {COMPILER!r} cannot run ({e.strerror}); " "set $CXX to a C++17 compiler"
      ) from e
    if proc.returncode:
      errors = [l for l in proc.stderr.splitlines() if "error" in l] or proc.stderr.splitlines()
      raise RuntimeError(
          f"{COMPILER} failed on {SOURCE} (exit {proc.returncode}): "
          f"{errors[0] if errors else 'no message'}"
      )
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _prune(target)


def _prune(keep: pathlib.Path) -> None:
  """Deletes the other builds not loaded for PRUNE_DAYS days (old sources, jaxlibs)."""
  cutoff = time.time() - PRUNE_DAYS * 86400
  for old in keep.parent.glob("ms_deform_attn_cpu-*.so"):
    try:
      if old != keep and old.stat().st_mtime < cutoff:
        old.unlink()
    except OSError:  # another process pruned it first, or it is not ours to delete
      pass


def _load() -> tuple[bool, str]:
  try:
    path = library_path()
    if not path.exists():
      _compile(path)
    else:
      try:
        os.utime(path)  # in use: not pruned by another version's build
      except OSError:  # a read-only cache still loads
        pass
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(
        FORWARD_TARGET, jax.ffi.pycapsule(lib.MsDeformAttnForward), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        BACKWARD_TARGET, jax.ffi.pycapsule(lib.MsDeformAttnBackward), platform="cpu"
    )
  except (OSError, RuntimeError, AttributeError) as e:
    return False, str(e)
  return True, str(path)


def kernel_status() -> tuple[bool, str]:
  """(available, the library path or why not); builds on the first call."""
  if "status" not in _STATE:
    _STATE["status"] = _load()
    if not _STATE["status"][0]:
      warnings.warn(
          "fused CPU deformable attention unavailable, using 'gather': " + _STATE["status"][1],
          RuntimeWarning,
          stacklevel=3,
      )
  return _STATE["status"]


def _check(value, spatial_shapes, sampling_locations, attention_weights):
  b, s, nh, _ = value.shape
  nl = sampling_locations.shape[3]
  shapes = np.asarray(spatial_shapes, np.int64).reshape(-1, 2)
  if shapes.shape[0] != nl or int(shapes.prod(1).sum()) != s:
    raise ValueError(
        f"spatial_shapes {spatial_shapes} ({shapes.shape[0]} levels, "
        f"{shapes.prod(1).sum()} positions) do not match sampling_locations' "
        f"{nl} levels and value's {s} positions"
    )
  if (
      sampling_locations.shape[:3] != (b, sampling_locations.shape[1], nh)
      or attention_weights.shape != sampling_locations.shape[:-1]
  ):
    raise ValueError(
        f"value {value.shape}, sampling_locations {sampling_locations.shape}, "
        f"attention_weights {attention_weights.shape}: expected [B,S,H,Dh], "
        "[B,Lq,H,L,P,2], [B,Lq,H,L,P]"
    )
  return shapes.reshape(-1)


def _forward_call(value, flat_shapes, loc, attn):
  b, _, nh, dh = value.shape
  out = jax.ShapeDtypeStruct((b, loc.shape[1], nh, dh), jnp.float32)
  return jax.ffi.ffi_call(FORWARD_TARGET, out, vmap_method="sequential")(
      value, loc, attn, spatial_shapes=flat_shapes
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fused(value, shapes_key, loc, attn):
  return _forward_call(value, np.asarray(shapes_key, np.int64), loc, attn)


def _fused_fwd(value, shapes_key, loc, attn):
  return _fused(value, shapes_key, loc, attn), (value, loc, attn)


def _fused_bwd(shapes_key, residuals, grad_out):
  value, loc, attn = residuals
  results = (
      jax.ShapeDtypeStruct(value.shape, jnp.float32),
      jax.ShapeDtypeStruct(loc.shape, jnp.float32),
      jax.ShapeDtypeStruct(attn.shape, jnp.float32),
  )
  return tuple(
      jax.ffi.ffi_call(BACKWARD_TARGET, results, vmap_method="sequential")(
          value,
          loc,
          attn,
          grad_out.astype(jnp.float32),
          spatial_shapes=np.asarray(shapes_key, np.int64),
      )
  )


_fused.defvjp(_fused_fwd, _fused_bwd)


def ms_deform_attn_cpu(
    value: jax.Array,
    spatial_shapes: SpatialShapes,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
  """Same arguments and result as `deform_attn.ms_deform_attn_gather`; XLA:CPU only."""
  available, reason = kernel_status()
  if not available:
    raise RuntimeError(
        "deform_attn_impl 'cpu' (config.model.deform_attn_impl) needs the "
        f"fused kernel, which could not be built: {reason}"
    )
  flat_shapes = _check(value, spatial_shapes, sampling_locations, attention_weights)
  b, lq = sampling_locations.shape[:2]
  out = _fused(
      value.astype(jnp.float32),
      tuple(int(n) for n in flat_shapes),
      sampling_locations.astype(jnp.float32),
      attention_weights.astype(jnp.float32),
  )
  return out.reshape(b, lq, -1).astype(value.dtype)


def use_kernel() -> bool:
  """True where "auto" runs the kernel: XLA:CPU, one device, kernel built.

  A custom call cannot be partitioned by GSPMD: over several devices it would
  force all-gathers of its inputs, so "auto" keeps the gather there.
  """
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and kernel_status()[0]


def auto_impl(fallback: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """The "auto" impl: the kernel where `use_kernel()`, else `fallback`."""

  def ms_deform_attn_auto(value, spatial_shapes, sampling_locations, attention_weights):
    impl = ms_deform_attn_cpu if use_kernel() else fallback
    return impl(value, spatial_shapes, sampling_locations, attention_weights)

  return ms_deform_attn_auto
