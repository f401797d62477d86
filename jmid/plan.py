"""Compile the train step ahead of time, from abstract shapes, and say whether it fits.

    python -m jmid.plan --config=C [--config.k=v ...] [--topology=NAME] [--slices=N]
                        [--json=FILE]

builds the real train step for the config's mesh on a target and compiles it without
allocating an array, then prints per-device memory (params, optimizer state, the rest:
activations and temporaries) against the device's memory, FLOPs per step (XLA's count next to
jmid's model formula) and a verdict: exit 0 when it fits, 3 when it does not, 2 for bad input.
Targets: the local devices (exact; no --topology) or a TPU slice (`v5e:2x2`, `v5p:4x4x4`,
`v6e:8x8`: libtpu's compile-only devices on any host, exact, Mosaic kernels included; the
`tpu` extra installs libtpu; --slices=N joins N of them over DCN for mesh.dcn_*) or GPUs in
nodes of 8 (`h100:8`, `h200:64`: XLA's compile-only CUDA devices where jax's CUDA plugin is
installed, exact, Triton kernels included; else CPU stand-ins, an estimate; see gpus.py).
train runs the same check on its own step before allocating.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jmid import build, cli, configfile, fs, gpus, metrics, sharding, steps
from jmid import config as config_lib
from jmid.errors import UserError, first_line

GIB = 2**30
# HBM per chip by device_kind (datasheets): compile-only devices report no memory stats.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5e": 16 * GIB,
             "TPU v5p": 95 * GIB, "TPU v6 lite": 32 * GIB, "TPU v6e": 32 * GIB}
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the step is compiled for: its devices, and for a GPU target which GPU."""

  devices: list[jax.Device]
  what: str
  gpu: gpus.Gpu | None = None  # the GPU targeted (its devices report no memory)
  estimate: bool = False  # CPU stand-ins compiled for the GPU: no CUDA plugin here
  granule_of: Callable[[jax.Device], int] = sharding.granule  # node/slice of a device


def compile_train_step(c: config_lib.Config, train_step: Any, abstract_state: Any,
                       batch_sh: jax.sharding.NamedSharding) -> Any:
  """The jitted train_step lowered for this config's state and batch, compiled, under the
  batch's mesh: tracing reads it (activation constraints, the Pallas kernel per device in
  shard_map, ring attention when mesh.context > 1); without it they silently fall away."""
  batch = steps.abstract_batch(c.train.global_batch, c.data.seq_len, batch_sh)
  with jax.set_mesh(batch_sh.mesh):
    return train_step.lower(abstract_state, batch).compile()


def memory(compiled: Any) -> dict[str, int] | None:
  """Per-device bytes of one compiled step (XLA's memory analysis), None where the backend
  has none. Donated arguments alias their outputs: the peak counts them once."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # a backend without the analysis: no check rather than a wrong one
    return None
  if m is None:
    return None
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes)}
  out["per_device_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                             - out["alias_bytes"])
  return out


def step_bytes(compiled: Any) -> int | None:
  """Peak bytes per device of one step: arguments + outputs + temporaries - donated aliases."""
  m = memory(compiled)
  return None if m is None else m["per_device_bytes"]


def host_available_bytes() -> int | None:
  """MemAvailable (what the kernel can hand out without swapping), or None off Linux."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def device_capacity(device: jax.Device) -> tuple[int | None, str]:
  """(bytes one device can use, what it is): HBM from the device's stats on GPU/TPU, or from
  the datasheet table for compile-only devices; on CPU the host's available RAM, shared by
  every local CPU device."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # compile-only devices have none
    pass
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"
  for kind, hbm in HBM_BYTES.items():
    if kind in device.device_kind:
      return hbm, f"{device.device_kind} HBM"
  if device.platform != "cpu":
    return None, ""
  avail = host_available_bytes()
  if avail is None:
    return None, ""
  return avail // max(jax.local_device_count(), 1), "available host RAM per CPU device"


def hints(c: config_lib.Config, n_devices: int, platform: str) -> list[str]:
  """What to change when a step does not fit, most effective first."""
  out = []
  if n_devices > 1:
    out.append("shard params over more devices (mesh.fsdp)")
  if c.model.remat == "none":
    out.append("recompute activations (model.remat='full')")
  out.append("more train.microbatches or a smaller train.global_batch / data.seq_len")
  if c.data.seq_len >= 8192 and n_devices > 1:
    out.append("split long sequences over devices (mesh.context)")
  if platform == "cpu":
    out.append("or run it on accelerators")
  return out


def check_fits(c: config_lib.Config, compiled: Any, device: jax.Device) -> None:
  """Raises one UserError when the compiled step needs more than the device has."""
  need = step_bytes(compiled)
  have, what = device_capacity(device)
  if need is None or have is None or need <= have:
    return
  raise UserError(f"this config needs {_gib(need)} per device for one train step but the "
                  f"device has {_gib(have)} ({what}); try "
                  f"{', '.join(hints(c, jax.device_count(), device.platform))}")


def target(topology: str, slices: int = 1) -> Target:
  """The devices for --topology: '' is the local devices; a TPU slice name gives libtpu's
  compile-only devices (its start-up chatter on stderr is dropped), `slices` of them joined
  over DCN; 'h100:16' gives 16 CPU stand-ins in nodes of 8 (set before jax starts its CPU
  backend when this process has not yet)."""
  if slices < 1:
    raise UserError(f"--slices={slices}: must be >= 1")
  if slices > 1 and not topology.lower().startswith(TPU_GENERATIONS):
    raise UserError("--slices joins TPU slices; give a TPU --topology (for GPUs, count them: "
                    "h100:16 is two nodes of 8)")
  if not topology:
    devices = jax.devices()
    return Target(devices, f"{len(devices)} local {devices[0].platform} device(s)")
  generation, _, count = topology.lower().partition(":")
  if generation in gpus.GPUS:
    return _gpu_target(topology, generation, count)
  if generation not in TPU_GENERATIONS or not count:
    raise UserError(f"--topology={topology}: use a TPU slice name such as v5e:2x2, v5p:2x2x1, "
                    f"v6e:4x4 (generations {', '.join(TPU_GENERATIONS)}), a GPU count such as "
                    f"h100:8 ({', '.join(gpus.GPUS)}), or leave it out for the local devices")
  if importlib.util.find_spec("libtpu") is None:  # jax finds the TPU plugin through it
    raise UserError(f"--topology={topology} compiles through libtpu, which is not installed; "
                    "pip install -e '.[tpu]' (it installs on any Linux x86 host)")
  from jax.experimental import topologies
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: no metadata server
  # compile-only use touches no chip: another jax process holding libtpu's lockfile (any jax
  # started without JAX_PLATFORMS=cpu on a host with libtpu) must not stop the plan
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    with _stderr_dropped():
      devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                  num_slices=slices).devices)
  except Exception as e:
    raise UserError(f"--topology={topology}: libtpu knows no such slice ({first_line(e)}); use "
                    "a name such as v5e:2x2 or v5p:2x2x1") from None
  joined = f" x {slices} slices over DCN" if slices > 1 else ""
  return Target(devices, f"{len(devices)} {devices[0].device_kind} chips ({topology}{joined}, "
                "compile-only)")


def _gpu_target(topology: str, generation: str, count: str) -> Target:
  """n GPUs in nodes of 8: XLA's compile-only CUDA devices when jax's CUDA plugin is installed
  (exact), else CPU stand-ins of the same mesh (an estimate)."""
  if not count.isdigit() or int(count) < 1:
    raise UserError(f"--topology={topology}: name the GPU count, e.g. {generation}:8")
  n, per_node = int(count), gpus.GPUS_PER_NODE
  if n > per_node and n % per_node:
    raise UserError(f"--topology={topology}: more than one node takes a multiple of "
                    f"{per_node} GPUs")
  g = gpus.GPUS[generation]
  gpus.mem_fraction()  # a share that is not one ends here, before any compile
  nodes = f" in {n // per_node} nodes" if n > per_node else ""
  if gpus.cuda_plugin():
    with contextlib.suppress(Exception):  # compile-only: this host's own GPUs, if any, unused
      jax.config.update("jax_platforms", "cpu")
    try:
      with _stderr_dropped():  # the plugin's notes that this host has no CUDA driver
        devices = gpus.compile_only_devices(g, n)
    except Exception as e:
      raise UserError(f"--topology={topology}: jax's CUDA plugin made no compile-only "
                      f"devices ({first_line(e)}); uninstall it for a CPU estimate") from None
    return Target(devices, f"{n} x {g.kind}{nodes} (compile-only)", g)
  with contextlib.suppress(Exception):  # refused once the CPU backend has started
    jax.config.update("jax_num_cpu_devices", n)
  cpus = jax.devices("cpu")
  if len(cpus) < n:
    raise UserError(f"--topology={topology}: this process already has {len(cpus)} CPU "
                    "devices to stand in for the GPUs; run jmid.plan in a fresh process")
  first = cpus[0].id
  return Target(cpus[:n], f"{n} x {g.kind}{nodes}, an ESTIMATE from CPU stand-ins (install "
                "jax's CUDA plugin for an exact plan)", g, True,
                lambda d: (d.id - first) // per_node)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one compile of the train step says; as_json gives the stable JSON keys."""

  memory: dict[str, int | None]  # per device; None: the compiler stopped before counting
  params_bytes: int
  optimizer_bytes: int
  hbm_bytes: int | None
  hbm_what: str
  flops_per_step: float | None
  model_flops_per_step: float
  compile_seconds: float
  device_kind: str
  devices: str
  mesh: dict[str, int]
  layers_scanned: bool  # XLA's cost analysis counts a loop body once, not per iteration
  estimate: bool = False  # compiled for CPU stand-ins of the target (a GPU target)

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_bytes is None else self.memory["per_device_bytes"] <= self.hbm_bytes

  def as_json(self) -> dict[str, Any]:
    return {**self.memory, "params_bytes": self.params_bytes,
            "optimizer_bytes": self.optimizer_bytes, "hbm_bytes": self.hbm_bytes,
            "fits": self.fits, "flops_per_step": self.flops_per_step,
            "model_flops_per_step": self.model_flops_per_step,
            "compile_seconds": self.compile_seconds, "device_kind": self.device_kind,
            "devices": self.devices, "mesh": self.mesh, "layers_scanned": self.layers_scanned,
            "estimate": self.estimate}


def make_plan(c: config_lib.Config, t: Target) -> Plan:
  """Builds and compiles the config's train step for the target; nothing is allocated. For a
  GPU target cuDNN attention compiles as our flash kernel (the same blockwise memory): jax
  asks the cuDNN library of a real GPU while tracing it."""
  devices, what = t.devices, t.what
  mesh = sharding.make_mesh(c.mesh, devices, t.granule_of)
  attention = config_lib.choose_attention(c.model, "gpu", int(mesh.shape["context"])) \
      if t.gpu else build.attention_for(c, mesh)
  attention = "pallas" if t.gpu and attention == "cudnn" else attention
  c = dataclasses.replace(c, model=dataclasses.replace(c.model, attention=attention))
  build.check_runtime(c, mesh)
  su = build.setup(c, mesh)
  params, opt = (_shard_bytes(su.abstract_state[k]) for k in ("params", "opt_state"))
  model_flops = metrics.flops_per_token(c.model, c.data.seq_len) * (
      c.train.global_batch * c.data.seq_len)
  kind = t.gpu.kind if t.gpu else devices[0].device_kind
  mesh_sizes = {k: int(v) for k, v in mesh.shape.items()}
  t0 = time.perf_counter()
  try:
    compiled = compile_train_step(c, su.train_step, su.abstract_state, su.batch_sh)
  except Exception as e:  # the TPU compiler refuses a program beyond HBM: that is the verdict
    oom = _compiler_oom(e)
    if oom is None:
      raise
    temp, hbm = oom
    mem = {"argument_bytes": None, "output_bytes": None, "temp_bytes": temp,
           "alias_bytes": None, "per_device_bytes": params + opt + temp}
    return Plan(mem, params, opt, hbm, f"{kind} HBM the compiler can use", None, model_flops,
                round(time.perf_counter() - t0, 2), kind, what, mesh_sizes, c.model.scan_layers,
                t.estimate)
  seconds = time.perf_counter() - t0
  mem = memory(compiled)
  if mem is None:
    raise UserError(f"XLA gives no memory analysis for {what}; nothing to plan with")
  hbm, hbm_what = ((gpus.usable_bytes(t.gpu), f"{gpus.mem_fraction():.0%} of {kind} memory, "
                    "XLA_PYTHON_CLIENT_MEM_FRACTION") if t.gpu else device_capacity(devices[0]))
  return Plan(mem, params, opt, hbm, hbm_what, _xla_flops(compiled, len(devices)), model_flops,
              round(seconds, 2), kind, what, mesh_sizes, c.model.scan_layers, t.estimate)


_OOM = re.compile(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def _compiler_oom(e: Exception) -> tuple[int, int] | None:
  """(temporaries, usable HBM) in bytes from the TPU compiler's out-of-memory refusal."""
  m = _OOM.search(str(e))
  if m is None:
    return None
  unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  return (int(float(m.group(1)) * unit[m.group(2)]), int(float(m.group(3)) * unit[m.group(4)]))


def _shard_bytes(tree: Any) -> int:
  """Bytes of one device's shard of every array in an abstract tree with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _xla_flops(compiled: Any, n_devices: int) -> float | None:
  """XLA's FLOPs of one step over all devices (its cost analysis is per device program).
  Compile-only CUDA executables give none through jax's API: XLA's HLO cost analysis of the
  optimized module (the same count jax's API runs) gives it."""
  try:
    cost = compiled.cost_analysis()
    if not cost:
      from jax._src import xla_bridge
      from jax._src.lib import _jax
      cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"),
                                           compiled.runtime_executable().hlo_modules()[0])
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return None if flops is None or flops < 0 else float(flops) * n_devices


def report(p: Plan, name: str) -> str:
  """The lines the CLI prints."""
  m = p.memory
  rest = m["per_device_bytes"] - p.params_bytes - p.optimizer_bytes
  mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
  have = f" of {_gib(p.hbm_bytes)} ({p.hbm_what})" if p.hbm_bytes else ""
  once = ", the scanned layers counted once: model.scan_layers=False counts all" \
      if p.layers_scanned else ""
  flops = f"{p.flops_per_step:.3e} (XLA{once})" if p.flops_per_step else "? (XLA gives none)"
  verdict = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown"}[p.fits]
  return "\n".join([
      f"jmid plan: {name} on {p.devices} | mesh {mesh} | "
      + (f"compiled in {p.compile_seconds:.1f} s" if m["argument_bytes"] is not None else
         f"the compiler refused it, out of memory, after {p.compile_seconds:.1f} s"),
      f"per device: params {_gib(p.params_bytes)} + optimizer {_gib(p.optimizer_bytes)} + "
      f"activations and temporaries {_gib(rest)} = {_gib(m['per_device_bytes'])}{have}: "
      f"{verdict}",
      f"FLOPs per step: {flops} | {p.model_flops_per_step:.3e} (model: 6 x matmul params "
      "+ causal attention, no recompute)"])


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  usage = "usage: python -m jmid.plan --config=C [--config.k=v ...] [--topology=NAME] " \
          "[--slices=N] [--json=FILE]"
  flags = ("--topology=", "--slices=", "--json=")
  ours = {a.split("=", 1)[0][2:]: a.split("=", 1)[1] for a in argv if a.startswith(flags)}
  rest = [a for a in argv if not a.startswith(flags)]
  if any(not a.startswith("--config") for a in rest):
    raise UserError(usage)
  c = config_lib.from_configdict(configfile.parse([sys.argv[0], *rest]))
  slices = ours.get("slices", "1")
  if not slices.isdigit():
    raise UserError(f"--slices={slices}: must be a whole number")
  t = target(ours.get("topology", ""), int(slices))
  p = make_plan(c, t)
  print(report(p, c.run.name or "config"))
  if p.fits is False:
    platform = "gpu" if t.gpu else t.devices[0].platform
    print(f"jmid plan: try {', '.join(hints(c, len(t.devices), platform))}")
  if "json" in ours:
    fs.write_text(ours["json"], json.dumps(p.as_json(), indent=1))
  return 3 if p.fits is False else 0


@contextlib.contextmanager
def _stderr_dropped() -> Iterator[None]:
  """Drops what C++ writes to fd 2 meanwhile (libtpu's warnings about a host without TPUs)."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _gib(n: int) -> str:
  return f"{n / GIB:,.2f} GiB"


if __name__ == "__main__":
  sys.exit(main())
