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
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_result  # noqa: E402
from pallas_kernels import flash_attention  # noqa: E402


def _ours(q, k, v):
  return flash_attention(q, k, v, causal=True)


def _jax_nn(implementation: str) -> Callable:
  def f(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return f


BACKENDS = {"pallas": _ours, "cudnn": _jax_nn("cudnn"), "xla": _jax_nn("xla")}


def _timed(fn: Callable, args: tuple, iters: int) -> float:
  """Median seconds per call after a compile and a warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def measure(name: str, t: int, d: int, hq: int, hkv: int, batch: int, iters: int
            ) -> dict[str, float | str]:
  """TFLOP/s of forward, backward (fwd+bwd minus fwd) and fwd+bwd for one backend."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, t, hq, d), jnp.bfloat16)
  k, v = (jax.random.normal(x, (batch, t, hkv, d), jnp.bfloat16) for x in keys[1:3])
  do = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  attend = BACKENDS[name]
  fwd = jax.jit(attend)

  @jax.jit
  def fwd_bwd(q, k, v):
    o, pull = jax.vjp(attend, q, k, v)
    return o, pull(do)

  flops = 4 * batch * hq * t * t * d / 2  # causal: half the pairs
  try:
    tf = _timed(fwd, (q, k, v), iters)
    tfb = _timed(fwd_bwd, (q, k, v), iters)
  except Exception as e:  # noqa: BLE001 (recorded, the other backends go on)
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
  tera = 1e12
  return {"fwd_ms": tf * 1e3, "fwd_bwd_ms": tfb * 1e3, "fwd_tflops": flops / tf / tera,
          "bwd_tflops": 2.5 * flops / max(tfb - tf, 1e-9) / tera,
          "fwd_bwd_tflops": 3.5 * flops / tfb / tera}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="2048,4096,8192,16384,32768")
  p.add_argument("--head-dims", default="64,128")
  p.add_argument("--heads", default="32,8", help="query heads,kv heads")
  p.add_argument("--total-tokens", type=int, default=32768, help="batch = this / length")
  p.add_argument("--backends", default=",".join(BACKENDS))
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--out", default="benchmarks/results/attention.json")
  a = p.parse_args(argv)
  hq, hkv = (int(x) for x in a.heads.split(","))
  backends = a.backends.split(",")
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
      if "fwd_tflops" in ours and "fwd_tflops" in cudnn:
        row["pallas_over_cudnn"] = {k: ours[k] / cudnn[k] for k in
                                    ("fwd_tflops", "bwd_tflops", "fwd_bwd_tflops")}
      rows.append(row)
      cells = [f"{name} " + (f"{r['fwd_tflops']:.3g}/{r['bwd_tflops']:.3g}/"
                             f"{r['fwd_bwd_tflops']:.3g}" if "fwd_tflops" in r else "n/a")
               for name, r in ((n, row[n]) for n in backends)]
      print(f"T={t:6d} D={d:3d} B={batch:3d} | " + " | ".join(cells))
  write_result(a.out, {"benchmark": "attention", "heads": [hq, hkv], "rows": rows})


if __name__ == "__main__":
  main()
