"""Test session set-up: a persistent XLA compilation cache shared by the tests and
the subprocesses they start, so identical computations compile once per session, and
XLA:CPU's generated code at LLVM -O0 (compile time is most of the tests' time)."""

import os
import shutil
import tempfile

import filelock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Where tests keep what they train once for the whole session (train_fixtures.py):
# made by the first process that loads this file, inherited by pytest-xdist's workers
# and by the subprocesses the tests start.
os.environ.setdefault("MTACLIP_TEST_SHARED_DIR", tempfile.mkdtemp(prefix="mtaclip_tests_"))
# A size limit (below) turns on the cache's file lock: pytest-xdist's workers share the
# cache, and without the lock one could read an entry another is still writing. The
# directory is new with that limit: JAX's size-limited cache keeps an "-atime" file
# beside each entry and fails every write (a warning, nothing cached) in a directory
# that holds entries without one, as the one earlier versions of this file used does.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "mtaclip_jax_test_xla_cache_lru"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

# The tests compile far more than they run (the tiny model's train step: ~60 s to
# compile, 0.1 s to run on a 2-core CPU). LLVM at -O0 halves XLA:CPU's compile time
# (train step 63 -> 32 s, init 33 -> 17 s) and leaves matmuls and convolutions in
# their precompiled Eigen kernels; the elementwise code runs ~3x slower. Subprocesses
# inherit it. A developer's own XLA_FLAGS choice of the level stands.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  ).strip()

# As the entry points do on CPU (mtaclip_jax/runtime/xla_cpu.py): the XLA:CPU flag, and
# glibc keeps freed memory for the next computation instead of unmapping it and
# page-faulting it back in.
from mtaclip_jax.runtime import xla_cpu  # pylint: disable=wrong-import-position

xla_cpu.apply()
xla_cpu.keep_freed_memory()


def repair_compilation_cache() -> int:
  """Removes the cache's half-written entries; returns how many.

  JAX's size-limited cache writes an entry, then its "-atime" file, under a file lock.
  A process killed between the two (the fault tests kill runs; a developer stops the
  suite) leaves an entry without one, and from then on every write to the cache fails
  (its eviction scan reads each entry's "-atime"): nothing new is cached and every
  later run compiles again. Under the same lock, so no write is cut in half.
  """
  path = os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not os.path.isdir(path):
    return 0
  removed = 0
  with filelock.FileLock(os.path.join(path, ".lockfile"), timeout=60):
    names = set(os.listdir(path))
    for name in names:
      key, _, suffix = name.rpartition("-")
      twin = {"cache": f"{key}-atime", "atime": f"{key}-cache"}.get(suffix)
      if twin is not None and twin not in names:
        os.remove(os.path.join(path, name))
        removed += 1
  return removed


def pytest_configure(config):  # pylint: disable=unused-argument
  repair_compilation_cache()


def pytest_runtest_teardown(item):  # pylint: disable=unused-argument
  """After every test: a test that killed a run may have cut a cache write short."""
  repair_compilation_cache()


def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  """Workers for "-n auto" (pyproject's addopts): one more than the cores, at most 4.
  Most of the tests' time is XLA compiling on one thread, so a worker per core nearly
  halves it; the extra one fills the time a worker spends waiting on the runs it
  started (a process waiting for its peer to compile, a heartbeat timeout; measured in
  docs/BENCHMARKS.md). Each worker holds a few GB while compiling."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min((cores or 1) + 1, 4))


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """The process that made the shared folder removes it (xdist workers leave it)."""
  if not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["MTACLIP_TEST_SHARED_DIR"], ignore_errors=True)


# The longest files first (2026-12-06, two workers on 2 cores): pytest-xdist's
# "loadfile" hands out files in collection order, so a long file collected last would
# run alone at the end while the other worker idles. An order only: a file missing
# here runs in its usual place.
LONGEST_FIRST = (
    "integration/test_multihost.py",
    "integration/test_faults_kill.py",
    "integration/test_faults_disk.py",
    "parity/test_weight_path.py",
    "integration/test_train_multidevice.py",
    "unit/models/test_backbones.py",
    "unit/train/test_accumulate.py",
    "integration/test_train.py",
    "parity/test_clip_parity.py",
    "integration/test_folder_dataset.py",
)


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  def rank(item):
    path = item.nodeid.split("::")[0]
    for i, name in enumerate(LONGEST_FIRST):
      if path.endswith(name):
        return i
    return len(LONGEST_FIRST)

  items.sort(key=rank)  # stable: the rest keep their order
