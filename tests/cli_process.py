"""`python -m MODULE ARGS...` in a new process, without a new interpreter each time.

The command-line tests check what a user sees: the exit code and the lines on stderr
of a process of its own. Starting an interpreter and importing jax, flax, orbax and
grain takes 3-4 s of CPU on 2 cores, most of such a test. Here each command runs in a
process forked from one server process that imported the command-line modules once
(multiprocessing's "forkserver"; the server itself starts no jax backend and no
thread, so every fork starts as clean as a new interpreter). The command's stdout and
stderr go to files, as a terminal's would, and its exit status is the process's.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import runpy
import shutil
import signal
import sys
import tempfile

from tests import train_fixtures

# Imported once by the server process: what every command line imports.
PRELOAD = [
    "mtaclip_jax.cli.main",
    "mtaclip_jax.cli.predict",
    "mtaclip_jax.cli.export",
    "mtaclip_jax.cli.summary",
    "mtaclip_jax.data.generate",
]

_context = None


def _get_context():
  global _context
  if _context is None:
    _context = multiprocessing.get_context("forkserver")
    _context.set_forkserver_preload(PRELOAD)
  return _context


@dataclasses.dataclass
class Completed:
  """As subprocess.CompletedProcess: returncode, stdout, stderr (text)."""

  returncode: int
  stdout: str
  stderr: str


def _main(module, args, cwd, out_path, err_path):
  os.chdir(cwd)
  for path, fd in ((out_path, 1), (err_path, 2)):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(f, fd)
    os.close(f)
  sys.stdout = open(1, "w", buffering=1, closefd=False)  # pylint: disable=consider-using-with
  sys.stderr = open(2, "w", buffering=1, closefd=False)  # pylint: disable=consider-using-with
  sys.argv = [module] + list(args)
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  finally:
    sys.stdout.flush()
    sys.stderr.flush()


def run(module: str, *args: str, cwd: str = train_fixtures.ROOT, timeout: float = 300):
  """Runs `python -m module *args` in `cwd`; returns a `Completed`."""
  with tempfile.TemporaryDirectory() as d:
    out_path, err_path = os.path.join(d, "stdout"), os.path.join(d, "stderr")
    proc = _get_context().Process(target=_main, args=(module, args, cwd, out_path, err_path))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
      proc.kill()
      proc.join()
      raise TimeoutError(f"python -m {module} {' '.join(args)}: still running after {timeout} s")
    with open(out_path) as f_out, open(err_path) as f_err:
      return Completed(proc.exitcode, f_out.read(), f_err.read())


class Started:
  """A command started by `start`, running on its own: its pid, exit status (`poll`,
  `wait`: negative for a signal, as subprocess's) and the stderr written so far."""

  def __init__(self, module: str, args, cwd: str):
    self._dir = tempfile.mkdtemp()
    self._err = os.path.join(self._dir, "stderr")
    out = os.path.join(self._dir, "stdout")
    self._proc = _get_context().Process(target=_main, args=(module, args, cwd, out, self._err))
    self._proc.start()
    self.pid = self._proc.pid

  def poll(self):
    return self._proc.exitcode

  def wait(self, timeout: float | None = None):
    self._proc.join(timeout)
    if self._proc.exitcode is None:
      raise TimeoutError(f"process {self.pid} still running after {timeout} s")
    return self._proc.exitcode

  def stderr(self) -> str:
    try:
      with open(self._err) as f:
        return f.read()
    except FileNotFoundError:  # not opened yet by the new process
      return ""

  def signal(self, sig: int = signal.SIGKILL):
    os.kill(self.pid, sig)

  def close(self):
    if self._proc.exitcode is None:
      self._proc.kill()
      self._proc.join()
    shutil.rmtree(self._dir, ignore_errors=True)


def start(module: str, *args: str, cwd: str = train_fixtures.ROOT) -> Started:
  """Starts `python -m module *args` in `cwd` and returns at once; `close()` it."""
  return Started(module, args, cwd)


def module_args(cmd):
  """(module, args) of a command line `[sys.executable, "-m", module, *args]`."""
  assert cmd[:2] == [sys.executable, "-m"], cmd
  return cmd[2], cmd[3:]
