"""Multi-process start-up: `jax.distributed.initialize` before any other jax call.

One process per host (GPU node, TPU VM) or per group of devices. Three ways, first match wins:
- JMID_COORDINATOR_ADDRESS=host:port, JMID_NUM_PROCESSES=N, JMID_PROCESS_ID=i set by hand or by
  a launcher (launch/ scripts; also how tests start several CPU processes on one machine);
- SLURM with more than one task, or a TPU VM slice of several hosts (GKE, gcloud, multislice):
  jax detects the cluster itself;
- otherwise a single process, and nothing to do.

The wait for the coordinator is bounded (JMID_INIT_TIMEOUT seconds, default 300): XLA aborts
the process with a stack dump when it gives up, so jmid first waits for the coordinator's port
itself and ends in one line. Then the processes compare their resolved configs
(same_config): processes of one job that disagree (a stale file on one host) all stop, naming
the first key that differs, before anything is written.
"""

from __future__ import annotations

import collections
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
  """SLURM with several tasks, or a TPU VM whose slice(s) span several hosts; jax's own cluster
  detection then finds the coordinator and this process's place."""
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or tpu_hosts() > 1


def tpu_hosts() -> int:
  """Hosts of this TPU VM's job: GKE names them (TPU_WORKER_HOSTNAMES), a TPU VM created with
  gcloud lists them in its metadata, multislice multiplies by MEGASCALE_NUM_SLICES; 1 off a
  TPU VM (jax decides that at import: libtpu and TPU chips on this host)."""
  from jax._src import cloud_tpu_init
  if not cloud_tpu_init.running_in_cloud_tpu_vm:
    return 1
  slices = os.environ.get("MEGASCALE_NUM_SLICES", "1")
  slices = int(slices) if slices.isdigit() else 1
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if hosts:
    return slices * len(hosts.split(","))
  try:  # the metadata server of a TPU VM (jax's own reader; private, so guarded)
    from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster
    if GceTpuCluster.is_env_present():
      return slices * len(GceTpuCluster._get_worker_list_in_slice())
  except Exception:
    pass
  return slices


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


class StopVote:
  """Whether any process of the job got SIGINT/SIGTERM, so that all stop after the same step:
  a scheduler may signal one process of a job (one node's preemption), and a process that
  stopped alone would leave the others waiting in a collective. Each step adds each process's
  signal number to a tiny max-reduction over the devices, dispatched with the step; the result
  is read LAG steps later, when the device has long computed it, so the loop does not wait on
  it, and every process reads the same value at the same step. Alone, the own flag decides."""

  LAG = 2

  def __init__(self, mesh: jax.sharding.Mesh) -> None:
    self.multi = jax.process_count() > 1
    self.pending: collections.deque = collections.deque()
    if self.multi:
      import jax.numpy as jnp
      from jax.sharding import NamedSharding, PartitionSpec as P
      self.sharding = NamedSharding(mesh, P(mesh.axis_names))  # one value per device
      self.local = len(mesh.local_devices)
      self.reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  def after_step(self, signum: int) -> int:
    """The signal every process agrees to stop for after this step (0: go on)."""
    if not self.multi:
      return signum
    mine = np.full(self.local, signum, np.int32)
    flags = jax.make_array_from_process_local_data(self.sharding, mine,
                                                   (jax.device_count(),))
    self.pending.append(self.reduce(flags))
    return int(self.pending.popleft()) if len(self.pending) > self.LAG else 0


def process_shard() -> dict[str, int]:
  """This process's place among the job's processes: which rows of each batch it reads."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}
