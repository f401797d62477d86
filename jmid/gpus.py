"""The GPUs jmid.plan can target, and XLA's compile-only CUDA devices for them.

jax's CUDA plugin (installed with jax[cuda12] or jax[cuda13], on any Linux host, GPU or not)
compiles for a GPU it is only told about: a GpuTargetConfigProto (the datasheet facts XLA's GPU
compiler reads: SMs, shared memory, L2, bandwidth, compute capability) and a topology
"partitions x hosts x GPUs per host". The plan is then XLA's own GPU program: its fusions, its
Triton kernels (our Pallas flash attention compiles for real, ptxas included), its memory
analysis. Without the plugin jmid.plan falls back to CPU stand-ins and says it is an estimate.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax

from jmid.errors import UserError

GPUS_PER_NODE = 8  # an HGX node: NVLink inside, InfiniBand between nodes
# The share of each GPU's memory jax's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION) unless
# the user sets it: jmid.train sets this (jmid/runtime.py), where jax's own default is 0.75
DEFAULT_MEM_FRACTION = 0.90


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One GPU model's datasheet, as the CUDA driver reports it."""

  kind: str  # jax's device_kind on the real GPU
  memory: int  # bytes, the driver's total (what the allocator's fraction is taken of)
  sms: int
  compute_capability: tuple[int, int]
  bandwidth: int  # HBM bytes/s
  l2_bytes: int
  clock_ghz: float
  smem_per_sm: int
  smem_per_block_optin: int
  fp32_per_sm: int


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 84942979072, 132, (9, 0), 3352320000000, 50 * 2**20,
                1.98, 228 * 2**10, 227 * 2**10, 128),
    "h200": Gpu("NVIDIA H200", 151397597184, 132, (9, 0), 4800000000000, 50 * 2**20, 1.98,
                228 * 2**10, 227 * 2**10, 128),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", 85100068864, 108, (8, 0), 2039040000000, 40 * 2**20,
                1.41, 164 * 2**10, 163 * 2**10, 64),
}


def mem_fraction() -> float:
  """The share of each GPU jax will use, as the run's environment sets it."""
  v = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", str(DEFAULT_MEM_FRACTION))
  try:
    f = float(v)
  except ValueError:
    f = -1.0
  if not 0 < f <= 1:
    raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={v}: must be a fraction in (0, 1], e.g. "
                    f"{DEFAULT_MEM_FRACTION}; unset it for jmid's default")
  return f


def usable_bytes(g: Gpu) -> int:
  return int(g.memory * mem_fraction())


def target_config(g: Gpu) -> str:
  """The GpuTargetConfigProto (text format) XLA's compiler needs for `g`; Hopper's sm_90a."""
  major, minor = g.compute_capability
  ext = " feature_extension: ACCELERATED_FEATURES" if major == 9 else ""
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  shared_memory_per_block: 49152 shared_memory_per_core: {g.smem_per_sm}
  shared_memory_per_block_optin: {g.smem_per_block_optin}
  core_count: {g.sms} fpus_per_core: {g.fp32_per_sm} clock_rate_ghz: {g.clock_ghz}
  memory_bandwidth: {g.bandwidth} l2_cache_size: {g.l2_bytes} device_memory_size: {g.memory}
  cuda_compute_capability {{ major: {major} minor: {minor}{ext} }}
  name: "{g.kind}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{g.kind}"
"""


def cuda_plugin() -> str | None:
  """The installed jax CUDA plugin's module name, or None."""
  for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
    try:
      if importlib.util.find_spec(name) is not None:
        return name
    except ModuleNotFoundError:
      return None
  return None


def compile_only_devices(g: Gpu, n: int) -> list[jax.Device]:
  """n compile-only devices of GPU `g` in nodes of GPUS_PER_NODE (process_index is the node,
  as one jmid process per node sees it); raises what the plugin raises."""
  from jax.experimental import topologies
  nodes, per_node = (n // GPUS_PER_NODE, GPUS_PER_NODE) if n > GPUS_PER_NODE else (1, n)
  desc = topologies.get_topology_desc(platform="cuda", target_config=target_config(g),
                                      topology=f"1x{nodes}x{per_node}")
  return list(desc.devices)
