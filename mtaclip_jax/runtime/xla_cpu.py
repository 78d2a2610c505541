"""XLA:CPU settings (docs/BENCHMARKS.md): an XLA flag at import, malloc on CPU runs.

jaxlib 0.10's XLA:CPU fuses gathers feeding a reduction into YNNPACK "library
fusions"; for the deformable-attention sampling (a gather of 48 taps reduced with
their weights) that fusion ran 2-6x slower than XLA's own loop fusion, and the whole
train step ~25% slower, while matmuls and convolutions ran at the same rate without
it. So, unless the user already chose a value in XLA_FLAGS or sets
MTACLIP_KEEP_XLA_CPU_FUSION=1, `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK
fusions) is appended to XLA_FLAGS before jax creates its CPU client. Only for the
jaxlib versions where the flag was measured (an unknown flag aborts XLA); it has no
effect on GPU or TPU.

`keep_freed_memory()` (the entry points call `keep_freed_memory_on_cpu()`):
XLA:CPU mallocs each step's temporaries (6.6 GiB for the 512x512 batch-2 train
step). glibc serves blocks over 32 MiB with fresh mmaps and unmaps them on free, so
every step page-faults and zero-fills all of them again: a third of the step went to
the kernel. With M_MMAP_MAX=0 (big blocks from the heap) and M_TRIM_THRESHOLD=-1
(freed heap is kept), the next step reuses the same pages. The process then keeps
its peak memory until it exits. MTACLIP_SYSTEM_MALLOC=1 leaves glibc's defaults.
"""

import ctypes
import importlib.metadata
import os

import jax

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
MEASURED_JAXLIB = ("0.10.",)


def apply() -> bool:
  """Appends FLAG to XLA_FLAGS when appropriate; returns whether it did."""
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("MTACLIP_KEEP_XLA_CPU_FUSION") or "ynn_fusion_type" in flags:
    return False
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  if not version.startswith(MEASURED_JAXLIB):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True


M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, <malloc.h>
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """glibc: serve big blocks from the heap and never trim it; returns whether set."""
  if os.environ.get("MTACLIP_SYSTEM_MALLOC"):
    return False
  try:
    process, libc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  if (
      ctypes.cast(process.malloc, ctypes.c_void_p).value
      != ctypes.cast(libc.malloc, ctypes.c_void_p).value
  ):
    return False  # another allocator (e.g. jemalloc via LD_PRELOAD) serves malloc
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def keep_freed_memory_on_cpu() -> bool:
  """`keep_freed_memory()` when jax's default backend is the CPU (entry points)."""
  return jax.default_backend() == "cpu" and keep_freed_memory()
