"""mtaclip_jax.xla_cpu: the XLA:CPU flag is added once, never over a user's choice;
glibc malloc keeps freed memory unless opted out or another allocator serves malloc."""

import importlib.metadata
import os
import subprocess

from mtaclip_jax.runtime import xla_cpu


def test_appends_flag_to_existing_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.delenv("MTACLIP_KEEP_XLA_CPU_FUSION", raising=False)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  assert xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 " + xla_cpu.FLAG)
  assert not xla_cpu.apply()  # already there: unchanged
  assert os.environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_keeps_a_users_value_and_honours_opt_out(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert not xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MTACLIP_KEEP_XLA_CPU_FUSION", "1")
  assert not xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == ""


def test_only_for_measured_jaxlib(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.delenv("MTACLIP_KEEP_XLA_CPU_FUSION", raising=False)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.0")
  assert not xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == ""


_RSS_AFTER_FREE = """
import ctypes, os, sys
from mtaclip_jax.runtime import xla_cpu
print(xla_cpu.keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
def rss():
  return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
n = 256 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)  # touch every page
before = rss()
libc.free(p)
print((before - rss()) >> 20)  # MiB given back to the OS by free()
"""


def _run_rss_probe(env):
  import subprocess  # pylint: disable=g-import-not-at-top,multiple-imports
  import sys

  out = subprocess.run(
      [sys.executable, "-c", _RSS_AFTER_FREE], env=env, check=True, capture_output=True, text=True
  ).stdout.split()
  return out[0] == "True", int(out[1])


def test_keep_freed_memory_keeps_a_freed_block_and_honours_opt_out():
  # A freed 256 MiB block stays mapped for the next step's temporaries; with
  # MTACLIP_SYSTEM_MALLOC=1 glibc unmaps it on free, as by default.
  env = {k: v for k, v in os.environ.items() if k != "MTACLIP_SYSTEM_MALLOC"}
  applied, released = _run_rss_probe(env)
  assert applied and released < 16, released
  applied, released = _run_rss_probe({**env, "MTACLIP_SYSTEM_MALLOC": "1"})
  assert not applied and released > 200, released


# A minimal malloc interposer, as jemalloc via LD_PRELOAD is one (built here with the
# C++ compiler the deformable-attention kernel needs anyway).
_INTERPOSER = r"""
#include <dlfcn.h>
#include <stddef.h>
extern "C" void* malloc(size_t n) {
  static void* (*next)(size_t) = (void* (*)(size_t))dlsym(RTLD_NEXT, "malloc");
  return next(n);
}
"""


def test_keep_freed_memory_leaves_another_allocator_alone(tmp_path):
  src, lib = tmp_path / "interposer.cc", tmp_path / "libinterposer.so"
  src.write_text(_INTERPOSER)
  subprocess.run(
      [os.environ.get("CXX", "g++"), "-shared", "-fPIC", "-O1", str(src), "-o", str(lib), "-ldl"],
      check=True,
  )
  env = {k: v for k, v in os.environ.items() if k != "MTACLIP_SYSTEM_MALLOC"}
  applied, _ = _run_rss_probe({**env, "LD_PRELOAD": str(lib)})
  assert not applied
