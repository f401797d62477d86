"""What benchmarks/train.py, its peer (train_peer.py) and its sweep (train_sweep.py) share: the
result type, the timing loop both systems run, and the summary lines of one result. It imports
none of them, so none of the three imports another in a cycle."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

Result = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Timing, shared by both systems


def timed(step: Callable[[], Any], steps: int, wait: Callable[[Any], None]) -> Result:
  """First step (compile included) on its own, then `steps` steps waited for once at the end.
  `step` returns the step's loss (on the device); `wait` blocks until it and the state exist."""
  t0 = time.perf_counter()
  first = step()
  wait(first)
  compile_seconds = time.perf_counter() - t0
  last = first
  t0 = time.perf_counter()
  for _ in range(steps):
    last = step()
  wait(last)
  return {"step_seconds": (time.perf_counter() - t0) / max(steps, 1),
          "compile_seconds": compile_seconds,
          "loss_first": float(first), "loss_last": float(last)}


def throughput(timing: Result, tokens_per_step: int, flops_per_token: float,
               peak: float | None, devices: int) -> Result:
  tokens_per_sec = tokens_per_step / timing["step_seconds"]
  mfu = flops_per_token * tokens_per_sec / (peak * devices) if peak else None
  return {"tokens_per_sec": tokens_per_sec, **timing, "mfu": mfu}


def ratio(jmid: Result | None, peer: Result | None) -> float | None:
  """jmid's tokens/s per device over the peer's (one device)."""
  if not jmid or not peer or "error" in jmid or "error" in peer:
    return None
  return jmid["tokens_per_sec"] / jmid["devices"] / peer["tokens_per_sec"]


# ---------------------------------------------------------------------------------------------
# The summary of one result


def summary(result: Result) -> Iterator[str]:
  for name in ("jmid", "peer"):
    r = result.get(name)
    if r is not None:
      yield f"{name:5s}: {_system_line(r)}"
  if result.get("ratio") is not None:
    yield f"ratio: {result['ratio']:.3f} (jmid tokens/s per device / peer tokens/s)"


def _system_line(r: Result) -> str:
  if "error" in r:
    return f"FAILED {r['error']}"
  mfu = f"mfu {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "mfu -"
  mem = (f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None
         else "peak -")
  return (f"{r['tokens_per_sec']:12,.0f} tok/s  {r['step_seconds'] * 1e3:9.1f} ms/step  "
          f"compile {r['compile_seconds']:6.1f} s  {mfu}  {mem}  "
          f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
