"""Multi-process start-up: `jax.distributed.initialize` when more than one process runs.

Detected from explicit flags, the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID variables (launch/gpu_multinode.sh), SLURM (`srun`), or a TPU pod
(jax finds the other workers itself). A single process does nothing here.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


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
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
  if not wanted(coordinator, num_processes):
    return
  kwargs = {}
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
