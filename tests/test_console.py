"""console.install: library tracebacks and the closed-event-loop noise stay off
stderr; everything else still shows (subprocesses, so pytest's own hooks stay)."""

import os
import subprocess
import sys

SCRIPT = """
import threading
from absl import logging
from mtaclip_jax import console
console.install()
logging.set_verbosity(logging.WARNING)
try:
  raise ValueError("write failed")
except ValueError as e:
  logging.exception("background save failed: %s", e)
def closed():
  raise RuntimeError("Event loop is closed")
def other():
  raise KeyError("real bug")
for target in (closed, other):
  t = threading.Thread(target=target)
  t.start()
  t.join()
"""


def _stderr(env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        env=env, timeout=120, check=True).stderr


def test_library_tracebacks_and_closed_loop_noise_are_dropped():
  err = _stderr()
  assert "background save failed: write failed" in err  # the log line stays
  assert "ValueError: write failed" not in err  # its traceback does not
  assert "Event loop is closed" not in err
  assert "KeyError: 'real bug'" in err  # other thread failures still show


def test_mtaclip_tracebacks_keeps_everything():
  err = _stderr({"MTACLIP_TRACEBACKS": "1"})
  assert "ValueError: write failed" in err and "Event loop is closed" in err
