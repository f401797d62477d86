"""Training throughput of jmid against PyTorch + transformers on the same model and batch.

  python benchmarks/train.py --config=C [--config.k=v ...] [--steps=20] [--rows-per-device=R]
                             [--peer [--peer-compile] [--peer-mask=causal|documents]]
                             [--out=benchmarks/results/train.json]
  python benchmarks/train.py --sweep [--sweep-scale=full|tiny] [--steps=10] [--peer]
                             [--out=benchmarks/results/train_sweep.json]

Why: "tokens/s" means little without a reference. The peer is the model a user would otherwise
train: the Hugging Face class jmid exports to (jmid.families.hf_config), with SDPA attention,
fused AdamW with jmid's betas, eps, weight decay and gradient clipping, bf16 autocast when jmid
computes in bf16 on a GPU (float32 otherwise), optionally torch.compile.

How: the config is built as `python -m jmid.train` builds it (jmid.configfile.parse, then
config.from_configdict). ONE fixed packed batch (random tokens, several documents per row:
segment ids in increasing runs, positions restarting at 0, loss mask all ones) is made with
numpy and given to both. Each system times its first step (compile included) on its own, then
`--steps` steps, waiting for the device only at the end. Reported per system: tokens/s, seconds
per step, compile seconds, MFU (jmid.metrics.flops_per_token over the datasheet peak; None
where no peak is known, e.g. CPUs), peak device memory and the first and last loss. The data
pipeline, checkpoints and metrics of the real loop are not in these numbers
(benchmarks/train_step.py measures what the loop adds).

Fairness, as it stands:
  * The peer runs on one device the rows one of jmid's devices runs (global_batch / devices)
    and `ratio` is jmid's tokens/s per device over the peer's; on one device, plain
    jmid tokens/s over peer tokens/s. With several devices the peer pays no communication.
  * --peer-mask=causal (default): the peer's SDPA runs plain causal attention (its flash
    kernel on GPUs), so the documents of a row see each other where jmid isolates them; this
    favours the peer slightly. transformers >= 4.54 would build a block-diagonal mask from the
    restarting position_ids by itself, so this mode registers transformers' own SDPA forward
    under another name, which skips the mask builder. --peer-mask=documents keeps that mask
    (same semantics as jmid, a materialised [rows, 1, T, T] mask, no flash kernel).
  * The peer follows no schedule: it trains at optim.lr while jmid warms up from 0, so the
    last losses are a sanity check, not a comparison.
  * model.remat='full' turns on the peer's gradient checkpointing; other remat policies have
    no transformers equivalent. jax's persistent compilation cache stays off.

On a GPU the peer runs first: jax's backend takes 90% of the GPU's memory when it starts
(jmid.runtime) and keeps it until the process ends, so the peer trains, releases its memory,
and then jax starts. The sweep runs every entry as a child process of this script (a crash or
an out-of-memory ends one entry, recorded as an error string, never the sweep) and writes the
JSON after each entry, so an interrupted sweep keeps what it measured.

The peer lives in benchmarks/train_peer.py, the sweep in benchmarks/train_sweep.py, and what
they share with this file (the timing loop, the result's summary) in benchmarks/train_common.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from benchmarks.train_common import Result, ratio, summary, throughput, timed  # noqa: E402
from benchmarks.train_peer import (PEER_MASKS, PEER_NOTES, peer_problem,  # noqa: E402
                                   release_torch_memory, run_peer, torch_device)
from benchmarks.train_sweep import sweep  # noqa: E402
from jmid import config as config_lib  # noqa: E402
from jmid import build, cli, configfile, metrics, runtime, sharding  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The config and the batch


def load_config(path: str, overrides: list[str]) -> config_lib.Config:
  """The config as `python -m jmid.train` builds it (one ConfigError line when it is wrong)."""
  cfg = configfile.parse(["benchmark", f"--config={path}", *overrides])
  return config_lib.from_configdict(cfg)


def with_global_batch(c: config_lib.Config, rows: int) -> config_lib.Config:
  return dataclasses.replace(c, train=dataclasses.replace(c.train, global_batch=rows))


def make_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A packed batch of random tokens: each row holds documents of seq_len/8 to seq_len/2
  tokens (the last one cut), segment ids 1, 2, ... per document, positions restarting at 0 in
  each, every target counted. int32 [rows, seq_len] per key of jmid.steps.BATCH_KEYS."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)
  segments = np.stack([_segment_row(rng, seq_len) for _ in range(rows)])
  starts = np.zeros_like(segments, dtype=bool)
  starts[:, 0] = True
  starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
  index = np.arange(seq_len)
  last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
          "positions": (index - last_start).astype(np.int32),
          "loss_mask": np.ones((rows, seq_len), np.int32)}


def _segment_row(rng: np.random.Generator, seq_len: int) -> np.ndarray:
  lengths: list[int] = []
  while sum(lengths) < seq_len:
    lengths.append(int(rng.integers(max(seq_len // 8, 1), max(seq_len // 2, 2))))
  ids = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
  return ids[:seq_len]


# ---------------------------------------------------------------------------------------------
# jmid


def run_jmid(c: config_lib.Config, batch: dict[str, np.ndarray], steps: int) -> Result:
  """jmid's jitted, donated train_step on the batch, already on the mesh."""
  mesh = sharding.make_mesh(c.mesh)
  build.check_runtime(c, mesh)
  su = build.setup(c, mesh)
  with jax.set_mesh(mesh):
    box = {"state": su.create_state()}
    on_mesh = sharding.to_global(batch, su.batch_sh)

    def step() -> jax.Array:
      box["state"], m = su.train_step(box["state"], on_mesh)
      return m["loss"]

    timing = timed(step, steps, lambda loss: jax.block_until_ready((box["state"], loss)))
  devices = jax.device_count()
  out = throughput(timing, c.train.global_batch * c.data.seq_len,
                   metrics.flops_per_token(c.model, c.data.seq_len),
                   metrics.peak_flops(jax.devices()[0]), devices)
  return {**out, "peak_memory_bytes": jax_peak_memory(), "devices": devices,
          "attention": build.attention_for(c, mesh), "remat": c.model.remat,
          "dtype": c.model.compute_dtype}


def jax_peak_memory() -> int | None:
  """The largest peak_bytes_in_use of this process's devices; None where they do not say."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


# ---------------------------------------------------------------------------------------------
# One benchmark: both systems on one config


def error_string(e: BaseException) -> str:
  """One line for the JSON: the exception's type and its first non-empty line."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def guarded(fn: Callable[[], Result]) -> Result:
  """fn's result, or {"error": one line} when it raised (out of memory, a bad device...)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - any failure is a result of the benchmark
    return {"error": error_string(e)}


def jax_device_count(peer: bool) -> int:
  """jax's device count, without starting jax's GPU backend before the peer has run (torch
  sees the same CUDA devices jax would)."""
  if peer and runtime.gpu_likely() and torch_device() == "cuda":
    import torch
    return torch.cuda.device_count()
  return jax.device_count()


def benchmark(args: argparse.Namespace, overrides: list[str]) -> Result:
  c = load_config(args.config, overrides)
  devices = jax_device_count(args.peer)
  if args.rows_per_device:
    c = with_global_batch(c, args.rows_per_device * devices)
  batch = make_batch(c.train.global_batch, c.data.seq_len, c.model.vocab_size)
  notes = []
  peer = None
  if args.peer:
    peer_rows = {k: v[:max(c.train.global_batch // devices, 1)] for k, v in batch.items()}
    problem = peer_problem()
    peer = {"error": problem} if problem else guarded(
        lambda: run_peer(c, peer_rows, args.steps, args.peer_compile, args.peer_mask))
    release_torch_memory()
    notes.append(PEER_NOTES[args.peer_mask])
    notes.append("the peer trains the rows of one jmid device on one device; ratio is jmid "
                 "tokens/s per device over the peer's tokens/s")
  jmid = guarded(lambda: run_jmid(c, batch, args.steps))
  return {"benchmark": "train", "config": args.config,
          "overrides": [o[len("--config."):] for o in overrides], "steps": args.steps,
          "global_batch": c.train.global_batch, "seq_len": c.data.seq_len,
          "tokens_per_step": c.train.global_batch * c.data.seq_len,
          "jmid": jmid, "peer": peer, "ratio": ratio(jmid, peer), "notes": notes}


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """The script's flags, and the --config.k=v overrides (passed to jmid's config parser)."""
  overrides = [a for a in argv if a.startswith("--config.")]
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default=None,
                  help="default configs/demo/pretrain.py; --sweep: configs/base.py")
  ap.add_argument("--steps", type=int, default=None, help="timed steps after the first "
                  "(default 20; 10 per entry in --sweep)")
  ap.add_argument("--rows-per-device", type=int, default=0,
                  help="train.global_batch := this x jax's devices (0: the config's)")
  ap.add_argument("--peer", action="store_true", help="also train the model with transformers")
  ap.add_argument("--peer-compile", action="store_true", help="torch.compile the peer's loss")
  ap.add_argument("--peer-mask", choices=PEER_MASKS, default="causal")
  ap.add_argument("--sweep", action="store_true", help="the sizes x lengths x kernels sweep")
  ap.add_argument("--sweep-scale", choices=("full", "tiny"), default="full",
                  help="tiny: every entry shrunk to run on a CPU in seconds")
  ap.add_argument("--run-timeout", type=int, default=3600, help="seconds per sweep entry")
  ap.add_argument("--out", default=None)
  args = ap.parse_args([a for a in argv if not a.startswith("--config.")])
  if args.sweep:
    if overrides:
      ap.error("--sweep sets the model itself; --config.* overrides are for one benchmark")
  args.config = args.config or ("configs/base.py" if args.sweep else "configs/demo/pretrain.py")
  args.steps = args.steps if args.steps is not None else (10 if args.sweep else 20)
  if args.steps < 1:
    ap.error(f"--steps={args.steps}: time at least one step after the first")
  name = "train_sweep" if args.sweep else "train"
  args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{name}.json")
  return args, overrides


def _main(argv: list[str]) -> int:
  args, overrides = parse_args(argv)
  if args.sweep:
    result = sweep(args)
    write_result(args.out, result)
    return 0
  runtime.set_env_defaults()  # jmid.train's GPU flags, before any jax backend starts
  cli.quiet_library_errors()
  result = benchmark(args, overrides)
  for line in summary(result):
    print(line)
  write_result(args.out, result)
  failed = [k for k in ("jmid", "peer") if result[k] is not None and "error" in result[k]]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(cli.run(_main))
