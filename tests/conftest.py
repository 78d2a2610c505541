"""Test session set-up: a persistent XLA compilation cache shared by the tests and
the subprocesses they start, so identical train steps compile once per session."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "mtaclip_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# As the entry points do on CPU (mtaclip_jax/xla_cpu.py): glibc keeps freed memory for
# the next computation instead of unmapping it and page-faulting it back in.
from mtaclip_jax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

xla_cpu.keep_freed_memory()
