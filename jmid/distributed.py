"""Multi-process start-up: `jax.distributed.initialize` before any other jax call.

One process per host (GPU node, TPU VM) or per group of devices. Three ways, first match wins:
- JMID_COORDINATOR_ADDRESS=host:port, JMID_NUM_PROCESSES=N, JMID_PROCESS_ID=i set by hand or by
  a launcher (launch/ scripts; also how tests start several CPU processes on one machine);
- SLURM with more than one task, or a multi-host TPU slice: jax detects the cluster itself;
- otherwise a single process, and nothing to do.

The wait for the coordinator is bounded (JMID_INIT_TIMEOUT seconds, default 300): XLA aborts
the process with a stack dump when it gives up, so jmid first waits for the coordinator's port
itself and ends in one line. Then the processes compare their resolved configs
(same_config): processes of one job that disagree (a stale file on one host) all stop, naming
the first key that differs, before anything is written.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np

from jmid.errors import UserError

ENV = ("JMID_COORDINATOR_ADDRESS", "JMID_NUM_PROCESSES", "JMID_PROCESS_ID")
TIMEOUT_ENV = "JMID_INIT_TIMEOUT"
_NOTE = 240  # bytes of each process's note on how its config differs


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
    timeout = _timeout()
    address = os.environ[ENV[0]]
    left = timeout if i == 0 else _wait_for(address, timeout)  # process 0 is the coordinator
    # given by hand: no cluster detection, which inside SLURM's srun would keep only GPU
    # $SLURM_LOCALID of a node (its one-process-per-GPU convention) where jmid runs one per node
    jax.distributed.initialize(address, num_processes=n, process_id=i,
                               cluster_detection_method="deactivate",
                               initialization_timeout=max(1, int(left)))
  elif _cluster_detected():
    jax.distributed.initialize(initialization_timeout=_timeout())


def _timeout() -> int:
  raw = os.environ.get(TIMEOUT_ENV, "300")
  if not raw.isdigit() or int(raw) < 1:
    raise UserError(f"{TIMEOUT_ENV}={raw}: must be a whole number of seconds >= 1")
  return int(raw)


def _wait_for(address: str, timeout: float) -> float:
  """Waits until the coordinator's port accepts a connection; returns the seconds left."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"{ENV[0]}={address}: must be host:port")
  start = time.monotonic()
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return timeout - (time.monotonic() - start)
    except OSError as e:
      if time.monotonic() - start + 1 > timeout:
        raise UserError(f"the coordinator {address} ({ENV[0]}) did not answer within "
                        f"{timeout} s ({e.strerror or e}); start process 0 first, check the "
                        f"address and the firewall, or raise {TIMEOUT_ENV}") from None
      time.sleep(1)


def same_config(config: dict[str, Any]) -> None:
  """Every process of the job must run the same resolved config: each compares its own with
  process 0's, then all learn whether any differ, so they stop together (no one waits forever
  in a collective). Keys that may differ per process are left out by the caller."""
  if jax.process_count() < 2:
    return
  from jax.experimental import multihost_utils
  mine = json.dumps(config, sort_keys=True, default=str).encode()
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(mine))))
  buf = np.zeros(n, np.uint8)
  if jax.process_index() == 0:
    buf[:] = np.frombuffer(mine, np.uint8)
  theirs = json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())
  differ = (_first_difference(json.loads(mine), theirs) or "").encode()[:_NOTE]
  note = np.zeros(_NOTE, np.uint8)
  note[:len(differ)] = np.frombuffer(differ, np.uint8)  # every process learns every difference
  notes = np.asarray(multihost_utils.process_allgather(note)).reshape(-1, _NOTE)
  found = {p: bytes(row).rstrip(b"\0").decode(errors="replace") for p, row in enumerate(notes)}
  found = {p: text for p, text in found.items() if text}
  if not found:
    return
  first = min(found)
  raise UserError(f"the processes of this job run different configs (process(es) "
                  f"{', '.join(map(str, found))} differ from process 0; process {first}: "
                  f"{found[first]}); give every process the same config file and overrides")


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
  """The first key (dotted) whose value differs between two JSON trees, or None."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      key = f"{path}.{k}" if path else k
      if k not in a or k not in b:
        return f"{key} is set on one and not the other"
      d = _first_difference(a[k], b[k], key)
      if d:
        return d
    return None
  return None if a == b else f"{path}={a!r} here, {b!r} on process 0"


def barrier(name: str) -> None:
  """All processes wait here (e.g. until process 0 has changed the workdir); no-op alone."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def process_shard() -> dict[str, int]:
  """This process's place among the job's processes: which rows of each batch it reads."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}
