"""Multi-process runs: start-up, agreement between processes, preemption.

`initialize` calls `jax.distributed.initialize` when more than one process runs,
from explicit flags, the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
variables (launch/gpu_multinode.sh, launch/local_multiprocess.sh), SLURM (`srun`), or
a TPU pod (jax finds the other workers itself). A single process does nothing here,
and every helper below is then a no-op.

The helpers talk through jax's coordination service (the key-value store and barriers
of `jax.distributed`), not through device collectives: on CPU, gloo gives a
collective's first call only 30 s for every process to arrive, which a process still
compiling or checking its data can miss.

- `agreed(what)`: a block every process runs (start-up checks); when it fails on any
  process, every process raises the same one-line error.
- `barrier(name)`: wait until every process gets there.
- `Preemption`: SIGTERM to any one process makes all of them stop at the same step
  (jax's preemption service in multi-process runs; a Python handler otherwise).

A process that dies (kill -9, a crash) is noticed by the others within
`heartbeat_timeout_s` (the coordination service's heartbeat; immediately when it was
process 0, which hosts the service): jax ends them with "Terminating process because
the JAX distributed service detected fatal errors ... another task died" (SIGABRT),
instead of leaving them waiting in a collective. docs/SCALING.md.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal

import jax
from jax._src import distributed as jax_distributed  # the coordination client
from jax.experimental import multihost_utils

from mtaclip_jax import errors

log = logging.getLogger(__name__)

# jax's default: a process that sent no heartbeat for this long is declared dead.
HEARTBEAT_TIMEOUT_S = 100
# How long a process waits for the others at an agreement or barrier: their start-up
# checks, compiling the train step, an evaluation of their share of the images.
WAIT_TIMEOUT_S = 3600

_counter = itertools.count()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def wanted(coordinator: str | None, num_processes: int | None) -> bool:
  if coordinator or (num_processes or 0) > 1:
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if (_env_int("SLURM_NTASKS") or 1) > 1:
    return True
  # TPU pod slices: every worker sees TPU_WORKER_HOSTNAMES with several hosts.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
) -> None:
  if not wanted(coordinator, num_processes):
    return
  kwargs = {"heartbeat_timeout_seconds": int(heartbeat_timeout_s)}
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  if num_processes:
    kwargs["num_processes"] = num_processes
  if process_id is not None:
    kwargs["process_id"] = process_id
  jax.distributed.initialize(**kwargs)
  if jax.process_index() == 0:
    log.info(
        "jax.distributed: %d processes, %d devices (%d local)",
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
    )


def _client():
  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialized")
  return client


def barrier(name: str, timeout_s: float = WAIT_TIMEOUT_S) -> None:
  """Returns once every process has called `barrier` with this name (in the same
  order); no-op with one process."""
  if jax.process_count() == 1:
    return
  _client().wait_at_barrier(f"mtaclip/{name}/{next(_counter)}", int(timeout_s * 1000))


def _one_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [""])[0]


def _exchange(what: str, error: BaseException | None) -> None:
  """Every process posts its verdict, waits for all, and raises the first failure
  (lowest process index) if there is one."""
  client, me = _client(), jax.process_index()
  key = f"mtaclip/{what}/{next(_counter)}"
  verdict = "" if error is None else f"{type(error).__name__}\n{_one_line(error)}"
  client.key_value_set(f"{key}/{me}", verdict)
  client.wait_at_barrier(key, WAIT_TIMEOUT_S * 1000)
  failed = sorted(
      (int(k.rsplit("/", 1)[1]), v) for k, v in client.key_value_dir_get(key + "/") if v
  )
  if not failed:
    return
  process, verdict = failed[0]
  name, message = verdict.split("\n", 1)
  where = f" (on process {process} of {jax.process_count()})"
  user_errors = {cls.__name__: cls for cls in _user_error_classes()}
  if name in user_errors:
    raise user_errors[name](message + where) from error
  if error is not None and process == me:
    raise error  # a bug: its traceback, here where it happened
  raise errors.DistributedError(
      f"process {process} of {jax.process_count()} failed its {what}: {name}: {message}"
  )


def _user_error_classes():
  seen = []
  for base in errors.USER_ERRORS:
    stack = [base]
    while stack:
      cls = stack.pop()
      if cls.__module__ == errors.__name__ and cls not in seen:
        seen.append(cls)
      stack.extend(cls.__subclasses__())
  return seen


@contextlib.contextmanager
def agreed(what: str):
  """Runs the block on every process; if it raises on any of them, every process
  raises that error (a user error: the same class and one-line message, naming the
  process; a bug: its traceback there, `errors.DistributedError` elsewhere). With
  one process it is the block alone."""
  if jax.process_count() == 1:
    yield
    return
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    _exchange(what, e)
    raise
  _exchange(what, None)


class Preemption:
  """SIGTERM (a preemption notice) asks the loop to save and stop: `stop(step)`,
  called once per step by every process, is True at the same step on all of them.

  One process: a Python SIGTERM handler sets a flag. Several: jax's preemption service
  (started by `jax.distributed.initialize`) catches SIGTERM on whichever process gets
  it and agrees on the step (`multihost_utils.reached_preemption_sync_point`); a
  Python handler would replace its own, so none is installed."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def stop(self, step: int) -> bool:
    if self._multi and not self.requested:
      if multihost_utils.reached_preemption_sync_point(step):
        log.warning("SIGTERM received by a process: all save step %d and exit", step)
        self.requested = True
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
