"""Keeps a failed run's console to the entry point's one `error:` line.

When a checkpoint write fails (a full disk, a quota, permissions), orbax logs the
failure from each of its background threads with a full traceback, and tensorstore's
callbacks then hit the closed asyncio event loop hundreds of times ("RuntimeError:
Event loop is closed"): over 4000 lines of stderr before the one line that says what
happened and what to do (measured on the disk-full test,
tests/integration/test_faults_disk.py).
Also, depending on when the garbage collector runs, the failed writes' asyncio
futures are collected with their exceptions never retrieved and asyncio logs each one
with a traceback (300+ records in one test run); only the first is kept. `install()`
drops the tracebacks of the libraries' absl and asyncio log records, also those inside
a message's text (the first line of each message stays), and the closed-loop noise.
`MTACLIP_TRACEBACKS=1` keeps everything.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

_CLOSED_LOOP = "Event loop is closed"


def _closed_loop(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == _CLOSED_LOOP


class _NoLibraryTracebacks(logging.Filter):
  """On the "absl" logger, which the libraries (orbax) log through, and on "asyncio";
  this project logs through its own loggers, so its messages are untouched."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info:
      record.exc_info = None
      record.exc_text = None
    # An exception's text can carry a whole traceback (orbax logs tensorstore's errors
    # that way when a write fails with EFBIG): keep the message's first line.
    message = record.getMessage()
    if "\n" in message:
      first, rest = message.split("\n", 1)
      record.msg = (
          f"{first} [{rest.count(chr(10)) + 1} more lines; " f"MTACLIP_TRACEBACKS=1 shows them]"
      )
      record.args = ()
    return True


class _FirstUnretrieved(logging.Filter):
  """On "asyncio": of its "Future/Task exception was never retrieved" records (one per
  failed write future once they are collected, 300+ after a full disk) the first
  passes."""

  def __init__(self):
    super().__init__()
    self.shown = False

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg):
      return True
    shown, self.shown = self.shown, True
    return not shown


def install() -> None:
  """Idempotent; a no-op under MTACLIP_TRACEBACKS=1."""
  if os.environ.get("MTACLIP_TRACEBACKS") == "1" or getattr(install, "done", False):
    return
  install.done = True
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_NoLibraryTracebacks())
  logging.getLogger("asyncio").addFilter(_FirstUnretrieved())
  excepthook, thread_hook, unraisable = (sys.excepthook, threading.excepthook, sys.unraisablehook)

  def quiet_excepthook(kind, value, tb):
    if not _closed_loop(value):
      excepthook(kind, value, tb)

  def quiet_thread_hook(args):
    if not _closed_loop(args.exc_value):
      thread_hook(args)

  def quiet_unraisable(args):
    if not _closed_loop(args.exc_value):
      unraisable(args)

  sys.excepthook = quiet_excepthook
  threading.excepthook = quiet_thread_hook
  sys.unraisablehook = quiet_unraisable
