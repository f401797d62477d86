"""Compile the train step ahead of time, from abstract shapes, and check that it fits.

Nothing is allocated before this check: a config that cannot fit (a 17B model on a laptop, a
seq_len typo) ends with one line giving the step's memory per device, what the device has, and
what to change, instead of an out-of-memory crash minutes in. The compiled step is the one the
run trains with, so nothing is compiled twice.
"""

from __future__ import annotations

from typing import Any

import jax

from jmid import config as config_lib
from jmid import steps
from jmid.errors import UserError


def compile_train_step(c: config_lib.Config, train_step: Any, abstract_state: Any,
                       batch_sh: jax.sharding.Sharding) -> Any:
  """The jitted train_step lowered for this config's state and batch, compiled."""
  batch = steps.abstract_batch(c.train.global_batch, c.data.seq_len, batch_sh)
  return train_step.lower(abstract_state, batch).compile()


def step_bytes(compiled: Any) -> int | None:
  """Peak bytes per device of one step: arguments + outputs + temporaries - donated aliases."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # a backend without the analysis: no check rather than a wrong one
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


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
  """(bytes one device can use, what it is): HBM from the device's stats on GPU/TPU; on CPU the
  host's available RAM, shared by every local CPU device."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:
    pass
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"
  avail = host_available_bytes()
  if avail is None:
    return None, ""
  return avail // max(jax.local_device_count(), 1), "available host RAM per CPU device"


def check_fits(c: config_lib.Config, compiled: Any, device: jax.Device) -> None:
  """Raises one UserError when the compiled step needs more than the device has."""
  need = step_bytes(compiled)
  have, what = device_capacity(device)
  if need is None or have is None or need <= have:
    return
  hints = []
  if c.mesh.fsdp != -1 and jax.device_count() > 1:
    hints.append("shard params over more devices (mesh.fsdp)")
  if c.model.remat == "none":
    hints.append("recompute activations (model.remat='full')")
  hints.append("more train.microbatches or a smaller train.global_batch / data.seq_len")
  if device.platform == "cpu":
    hints.append("or run it on accelerators")
  raise UserError(f"this config needs {_gib(need)} per device for one train step but the "
                  f"device has {_gib(have)} ({what}); try {', '.join(hints)}")


def _gib(n: int) -> str:
  return f"{n / 2**30:,.2f} GiB"

