"""Multi-process start-up: `jax.distributed.initialize` before any other jax call.

One process per host (GPU node, TPU VM) or per group of devices. Three ways, first match wins:
- JMID_COORDINATOR_ADDRESS=host:port, JMID_NUM_PROCESSES=N, JMID_PROCESS_ID=i set by hand or by
  a launcher (launch/ scripts; also how tests start several CPU processes on one machine);
- SLURM with more than one task, or a multi-host TPU slice: jax detects the cluster itself;
- otherwise a single process, and nothing to do.
"""

from __future__ import annotations

import os

import jax

from jmid.errors import UserError

ENV = ("JMID_COORDINATOR_ADDRESS", "JMID_NUM_PROCESSES", "JMID_PROCESS_ID")


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def initialize() -> None:
  """Joins the processes of this job; a no-op for a single process."""
  given = [k for k in ENV if os.environ.get(k)]
  if given:
    missing = [k for k in ENV if k not in given]
    if missing:
      raise UserError(f"{', '.join(given)} set but {', '.join(missing)} not: set all three "
                      "(or none, for a single process)")
    try:
      n, i = int(os.environ[ENV[1]]), int(os.environ[ENV[2]])
    except ValueError:
      raise UserError(f"{ENV[1]} and {ENV[2]} must be integers") from None
    if not 0 <= i < n:
      raise UserError(f"{ENV[2]}={i} must be in [0, {ENV[1]}={n})")
    jax.distributed.initialize(os.environ[ENV[0]], num_processes=n, process_id=i)
  elif _cluster_detected():
    jax.distributed.initialize()


def barrier(name: str) -> None:
  """All processes wait here (e.g. until process 0 has changed the workdir); no-op alone."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def process_shard() -> dict[str, int]:
  """This process's place among the job's processes: which rows of each batch it reads."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}
