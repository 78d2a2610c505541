"""console.install: library tracebacks and the closed-event-loop noise stay off
stderr; everything else still shows (subprocesses, so pytest's own hooks stay)."""

import os
import subprocess
import sys

SCRIPT = """
import threading
from absl import logging
from mtaclip_jax.runtime import console
console.install()
logging.set_verbosity(logging.WARNING)
try:
  raise ValueError("write failed")
except ValueError as e:
  logging.exception("background save failed: %s", e)
logging.error("raised an exception: %s", "OUT_OF_RANGE: Error writing local file\\n"
              "Traceback (most recent call last):\\n  File 'serialization.py', line 193")
def closed():
  raise RuntimeError("Event loop is closed")
def other():
  raise KeyError("real bug")
for target in (closed, other):
  t = threading.Thread(target=target)
  t.start()
  t.join()
# A failed write's task collected with its exception never retrieved: asyncio logs it.
import asyncio, gc
async def failing_write():
  raise ValueError("OUT_OF_RANGE: Error writing local file")
loop = asyncio.new_event_loop()
tasks = [loop.create_task(failing_write()) for _ in range(5)]
loop.run_until_complete(asyncio.sleep(0))
loop.close()
del tasks
gc.collect()
"""


def _stderr(env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run(
      [sys.executable, "-c", SCRIPT],
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
      check=True,
  ).stderr


def test_library_tracebacks_and_closed_loop_noise_are_dropped():
  err = _stderr()
  assert "background save failed: write failed" in err  # the log line stays
  assert "ValueError: write failed" not in err  # its traceback does not
  # A traceback inside a message's text (tensorstore's errors logged by orbax, seen in
  # CI on a file-size-limit failure): the first line stays, with a count of the rest.
  assert "raised an exception: OUT_OF_RANGE: Error writing local file [2 more lines" in err
  assert "serialization.py" not in err
  assert "Event loop is closed" not in err
  assert "KeyError: 'real bug'" in err  # other thread failures still show
  assert err.count("Task exception was never retrieved [1 more lines") == 1  # of 5
  assert "failing_write" not in err


def test_mtaclip_tracebacks_keeps_everything():
  err = _stderr({"MTACLIP_TRACEBACKS": "1"})
  assert "ValueError: write failed" in err and "Event loop is closed" in err
  assert "serialization.py" in err
  assert err.count("in failing_write") == 5
