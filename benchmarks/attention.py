"""Attention TFLOP/s: our Pallas kernel against jax.nn.dot_product_attention (cuDNN and XLA),
forward, backward and forward+backward, measured in the same run.

    python benchmarks/attention.py                      # GPU: 2K..32K, head_dim 64 and 128
    python benchmarks/attention.py --lengths=256 --head-dims=64 --total-tokens=512   # CPU smoke

bf16, GQA 4:1 (32 query heads, 8 kv heads unless --heads), causal, batch = total tokens /
length. FLOPs: forward 4*B*Hq*T*S*D, backward 2.5x that (dq, dk, dv and the recomputed
logits), causal counted as half. Ratios are ours over cuDNN, measured back to back; a backend
that cannot run here (cuDNN off an NVIDIA GPU, a kernel on CPU at long lengths) is recorded with
its error instead of a number. Targets on an H100 at 8K, head_dim 128: forward >= 550 TFLOP/s,
forward+backward at least cuDNN's.

Ring mode (--ring=N, N devices): jmid.ring.ring_attention over a mesh axis of N devices, a row
of N*L tokens for each per-device length L in --lengths (batch = total tokens / L, so every
device holds as many tokens as the single-device run), against single-device attention at
length L on one device, measured in the same run. Per-device TFLOP/s: the causal FLOPs of the
whole N*L attention (the formula above) over N; the ratio ring / single-device (same
implementation, same per-device length) is what the ring keeps of one device's throughput
(1.0: the N-1 extra steps and their transfers cost nothing beyond their FLOPs). Layout zigzag
(--ring-layout=contiguous to see the causal imbalance), implementations pallas and xla (the
Pallas kernels or their jnp twin as blocks); random q/k/v count as already laid out.

    python benchmarks/attention.py --ring=8 --lengths=4096,8192        # GPU: 8 devices
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
      python benchmarks/attention.py --ring=4 --lengths=64 --head-dims=64 --heads=4,2 \\
      --total-tokens=128 --iters=2                                     # CPU smoke
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_result  # noqa: E402
from jmid import ring  # noqa: E402
from pallas_kernels import flash_attention  # noqa: E402


def _ours(q, k, v):
  return flash_attention(q, k, v, causal=True)


def _jax_nn(implementation: str) -> Callable:
  def f(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return f


BACKENDS = {"pallas": _ours, "cudnn": _jax_nn("cudnn"), "xla": _jax_nn("xla")}
RING_IMPLEMENTATIONS = ("pallas", "xla")  # ring_attention's block functions
METRICS = ("fwd_tflops", "bwd_tflops", "fwd_bwd_tflops")


def _timed(fn: Callable, args: tuple, iters: int) -> float:
  """Median seconds per call after a compile and a warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def _error(e: Exception) -> dict[str, str]:
  return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}


def _inputs(shapes: tuple[tuple[int, ...], ...], sharding=None) -> list[jax.Array]:
  """Random bf16 arrays of these shapes (q, k, v, do), made where `sharding` puts them."""
  keys = jax.random.split(jax.random.key(0), len(shapes))
  out = []
  for key, shape in zip(keys, shapes):
    make = functools.partial(jax.random.normal, shape=shape, dtype=jnp.bfloat16)
    out.append(jax.jit(make, out_shardings=sharding)(key))
  return out


def _throughput(attend: Callable, q, k, v, do, flops: float, iters: int
                ) -> dict[str, float | str]:
  """TFLOP/s of forward, backward (fwd+bwd minus fwd) and fwd+bwd of `attend(q, k, v)`."""
  fwd = jax.jit(attend)

  @jax.jit
  def fwd_bwd(q, k, v):
    o, pull = jax.vjp(attend, q, k, v)
    return o, pull(do)

  try:
    tf = _timed(fwd, (q, k, v), iters)
    tfb = _timed(fwd_bwd, (q, k, v), iters)
  except Exception as e:  # noqa: BLE001 (recorded, the other backends go on)
    return _error(e)
  tera = 1e12
  return {"fwd_ms": tf * 1e3, "fwd_bwd_ms": tfb * 1e3, "fwd_tflops": flops / tf / tera,
          "bwd_tflops": 2.5 * flops / max(tfb - tf, 1e-9) / tera,
          "fwd_bwd_tflops": 3.5 * flops / tfb / tera}


def _causal_flops(batch: int, hq: int, t: int, d: int) -> float:
  return 4 * batch * hq * t * t * d / 2  # causal: half the pairs


def measure(name: str, t: int, d: int, hq: int, hkv: int, batch: int, iters: int
            ) -> dict[str, float | str]:
  """TFLOP/s of forward, backward (fwd+bwd minus fwd) and fwd+bwd for one backend."""
  q, k, v, do = _inputs(((batch, t, hq, d), (batch, t, hkv, d), (batch, t, hkv, d),
                         (batch, t, hq, d)))
  return _throughput(BACKENDS[name], q, k, v, do, _causal_flops(batch, hq, t, d), iters)


def measure_ring(implementation: str, n: int, layout: str, t_local: int, d: int, hq: int,
                 hkv: int, batch: int, iters: int) -> dict[str, float | str]:
  """Per-device TFLOP/s of ring attention over n devices on rows of n * t_local tokens."""
  t = n * t_local
  try:
    ring.permutation(layout, n, t)  # the row splits into the layout's chunks
    mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])
    spec = P(None, "context")
    sharding = NamedSharding(mesh, spec)
    q, k, v, do = _inputs(((batch, t, hq, d), (batch, t, hkv, d), (batch, t, hkv, d),
                           (batch, t, hq, d)), sharding)
    seg = jax.device_put(jnp.ones((batch, t), jnp.int32), sharding)
    attend_local = functools.partial(ring.ring_attention, axis="context", n=n, layout=layout,
                                     causal=True, implementation=implementation)
    sharded = jax.shard_map(attend_local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec,
                            check_vma=False)
  except Exception as e:  # noqa: BLE001
    return _error(e)
  return _throughput(lambda q, k, v: sharded(q, k, v, seg), q, k, v, do,
                     _causal_flops(batch, hq, t, d) / n, iters)


def _cell(name: str, r: dict) -> str:
  return f"{name} " + (f"{r['fwd_tflops']:.3g}/{r['bwd_tflops']:.3g}/{r['fwd_bwd_tflops']:.3g}"
                       if "fwd_tflops" in r else "n/a")


def _ratios(a: dict, b: dict) -> dict[str, float] | None:
  if "fwd_tflops" in a and "fwd_tflops" in b:
    return {k: a[k] / b[k] for k in METRICS}
  return None


def run_ring(a: argparse.Namespace, hq: int, hkv: int, backends: list[str]) -> None:
  n = a.ring
  if len(jax.devices()) < n:
    sys.exit(f"--ring={n} needs {n} devices, this machine has {len(jax.devices())} "
             f"(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={n})")
  impls = [b for b in backends if b in RING_IMPLEMENTATIONS]
  rows = []
  print(f"device {jax.devices()[0].device_kind} x{n} | jax {jax.__version__} | bf16 causal "
        f"GQA {hq}:{hkv} | ring {a.ring_layout} | per-device TFLOP/s fwd / bwd / fwd+bwd, "
        f"ratio ring / single-device at the same per-device length L")
  for d in (int(x) for x in a.head_dims.split(",")):
    for t in (int(x) for x in a.lengths.split(",")):
      batch = max(1, a.total_tokens // t)
      row = {"length": t, "global_length": n * t, "head_dim": d, "batch": batch,
             "single": {}, "ring": {}, "ring_over_single": {}}
      for name in backends:
        row["single"][name] = measure(name, t, d, hq, hkv, batch, a.iters)
      for name in impls:
        row["ring"][name] = measure_ring(name, n, a.ring_layout, t, d, hq, hkv, batch, a.iters)
        ratio = _ratios(row["ring"][name], row["single"][name])
        if ratio is not None:
          row["ring_over_single"][name] = ratio
      rows.append(row)
      head = f"L={t:6d} N*L={n * t:7d} D={d:3d} B={batch:3d} "
      single = " | ".join(_cell(name, row["single"][name]) for name in backends)
      print(f"{head}| single {single}")
      for name in impls:
        ratio = row["ring_over_single"].get(name)
        tail = " | ring/single " + "/".join(f"{ratio[k]:.2f}" for k in METRICS) if ratio else ""
        print(f"{'':{len(head)}s}| ring   {_cell(name, row['ring'][name])}{tail}")
  for row in rows:  # the errors, once each, below the table
    for kind in ("single", "ring"):
      for name, r in row[kind].items():
        if "error" in r:
          print(f"  L={row['length']} D={row['head_dim']} {kind} {name}: {r['error']}")
  write_result(a.out or "benchmarks/results/attention_ring.json",
               {"benchmark": "attention_ring", "ring": n, "layout": a.ring_layout,
                "heads": [hq, hkv], "rows": rows})


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="2048,4096,8192,16384,32768",
                 help="sequence lengths; with --ring, per-device lengths")
  p.add_argument("--head-dims", default="64,128")
  p.add_argument("--heads", default="32,8", help="query heads,kv heads")
  p.add_argument("--total-tokens", type=int, default=32768,
                 help="batch = this / length (with --ring: tokens per device)")
  p.add_argument("--backends", default=None,
                 help=f"default {','.join(BACKENDS)}; with --ring, "
                      f"{','.join(RING_IMPLEMENTATIONS)} (those also run as the ring's blocks)")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--ring", type=int, default=0,
                 help="N > 1: ring attention over N devices against one device (0: off)")
  p.add_argument("--ring-layout", default="zigzag", choices=ring.LAYOUTS)
  p.add_argument("--out", default=None, help="default benchmarks/results/attention.json "
                 "(attention_ring.json with --ring)")
  a = p.parse_args(argv)
  hq, hkv = (int(x) for x in a.heads.split(","))
  if a.ring > 1:
    run_ring(a, hq, hkv, (a.backends or ",".join(RING_IMPLEMENTATIONS)).split(","))
    return
  backends = (a.backends or ",".join(BACKENDS)).split(",")
  rows = []
  print(f"device {jax.devices()[0].device_kind} | jax {jax.__version__} | bf16 causal "
        f"GQA {hq}:{hkv} | TFLOP/s fwd / bwd / fwd+bwd")
  for d in (int(x) for x in a.head_dims.split(",")):
    for t in (int(x) for x in a.lengths.split(",")):
      batch = max(1, a.total_tokens // t)
      row = {"length": t, "head_dim": d, "batch": batch}
      for name in backends:
        row[name] = measure(name, t, d, hq, hkv, batch, a.iters)
      ours, cudnn = row.get("pallas", {}), row.get("cudnn", {})
      ratio = _ratios(ours, cudnn)
      if ratio is not None:
        row["pallas_over_cudnn"] = ratio
      rows.append(row)
      cells = [_cell(name, row[name]) for name in backends]
      print(f"T={t:6d} D={d:3d} B={batch:3d} | " + " | ".join(cells))
  write_result(a.out or "benchmarks/results/attention.json",
               {"benchmark": "attention", "heads": [hq, hkv], "rows": rows})


if __name__ == "__main__":
  main()
