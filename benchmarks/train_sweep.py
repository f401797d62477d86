"""The sweep mode of benchmarks/train.py (--sweep): model sizes x sequence lengths, then
attention kernels and remat policies at one point, each entry run as a child process of
train.py. Apart from train.py because it drives that script rather than being part of one
run. Nothing here may start jax: its GPU backend would hold the memory the children need."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.train_common import Result, ratio, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train.py")  # what runs each entry

SIZES: dict[str, dict[str, Any]] = {  # Llama-shaped: ~125M (GPT-2 small), Llama 3.2 1B and 3B
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048,
                 vocab_size=32000, tie_embeddings=False),
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
               vocab_size=128256, tie_embeddings=True),
    "3b": dict(d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192,
               vocab_size=128256, tie_embeddings=True),
}
SEQ_LENS = (2048, 4096, 8192, 16384)
TOKENS_PER_DEVICE = 16384  # rows per device = this // seq_len
VARIANTS_AT = ("1b", 8192)
ATTENTIONS = ("xla", "cudnn", "pallas")
REMATS = ("full", "dots", "save:qkv,attn")
TINY = dict(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=256, tie_embeddings=False)
TINY_LAYERS = {"125m": 1, "1b": 2, "3b": 3}
TINY_DIVISOR = 64  # tiny: every sequence length and the tokens per device over this


@dataclasses.dataclass(frozen=True)
class Entry:
  size: str
  seq_len: int
  attention: str = "auto"
  remat: str = "none"

  @property
  def name(self) -> str:
    name = f"{self.size}-{self.seq_len // 1024}k"
    name += "" if self.attention == "auto" else f"-attn={self.attention}"
    return name + ("" if self.remat == "none" else f"-remat={self.remat}")

  @property
  def peer_key(self) -> tuple[str, int, bool]:
    """What the peer depends on: the same key, the same peer run."""
    return self.size, self.seq_len, self.remat == "full"


def sweep_entries() -> list[Entry]:
  grid = [Entry(size, seq) for size in SIZES for seq in SEQ_LENS]
  size, seq = VARIANTS_AT
  return (grid + [Entry(size, seq, attention=a) for a in ATTENTIONS]
          + [Entry(size, seq, remat=r) for r in REMATS])


def entry_args(e: Entry, scale: str) -> list[str]:
  """The command-line arguments of one entry, on configs/base.py."""
  if scale == "tiny":
    model = {**TINY, "n_layers": TINY_LAYERS[e.size]}
    seq_len, tokens, dtype = e.seq_len // TINY_DIVISOR, TOKENS_PER_DEVICE // TINY_DIVISOR, "float32"
  else:
    model, seq_len, tokens, dtype = SIZES[e.size], e.seq_len, TOKENS_PER_DEVICE, "bfloat16"
  sets = {f"model.{k}": v for k, v in model.items()}
  sets.update({"model.attention": e.attention, "model.remat": e.remat,
               "model.compute_dtype": dtype, "data.seq_len": seq_len, "data.demo": True})
  return ([f"--config.{k}={v}" for k, v in sets.items()]
          + [f"--rows-per-device={max(tokens // seq_len, 1)}"])


def run_entry(e: Entry, args: argparse.Namespace, peer: bool, tmp: str) -> Result:
  """One entry in a child process; its JSON, or what it said when it wrote none."""
  out = os.path.join(tmp, f"{len(os.listdir(tmp))}.json")
  cmd = [sys.executable, SCRIPT, f"--config={args.config}",
         *entry_args(e, args.sweep_scale), f"--steps={args.steps}", f"--out={out}",
         f"--peer-mask={args.peer_mask}"]
  cmd += ["--peer"] if peer else []
  cmd += ["--peer-compile"] if peer and args.peer_compile else []
  base: Result = {"name": e.name, "size": e.size, "attention": e.attention, "remat": e.remat}
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=args.run_timeout)
  except subprocess.TimeoutExpired:
    return {**base, "error": f"timed out after {args.run_timeout} s"}
  if os.path.exists(out):
    with open(out) as f:
      return {**base, **json.load(f)}
  lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
  return {**base, "error": f"exit code {proc.returncode}: {lines[-1].strip()}"[:500]}


def share_peers(runs: list[Result], entries: list[Entry]) -> None:
  """Entries that ran no peer take the peer of the entry with the same peer key."""
  measured = {e.peer_key: r for e, r in zip(entries, runs) if r.get("peer")}
  for e, r in zip(entries, runs):
    source = measured.get(e.peer_key)
    if "jmid" in r and not r.get("peer") and source is not None:
      r["peer_from"] = source["name"]
      r["ratio"] = ratio(r["jmid"], source["peer"])


def sweep(args: argparse.Namespace) -> Result:
  entries = sweep_entries()
  runs: list[Result] = []
  peered: set[tuple[str, int, bool]] = set()
  result = {"benchmark": "train_sweep", "config": args.config, "scale": args.sweep_scale,
            "steps": args.steps, "peer": args.peer, "runs": runs}
  with tempfile.TemporaryDirectory() as tmp:
    for e in entries:
      peer = args.peer and e.peer_key not in peered
      t0 = time.perf_counter()
      runs.append(run_entry(e, args, peer, tmp))
      if runs[-1].get("peer"):  # measured, or failed in a way the same peer would fail again
        peered.add(e.peer_key)
      share_peers(runs, entries[:len(runs)])
      print(f"[{len(runs)}/{len(entries)}] {e.name} ({time.perf_counter() - t0:.0f} s)",
            flush=True)
      for line in _entry_lines(runs[-1]):
        print(f"    {line}", flush=True)
      _write_partial(args.out, result)  # no jax here: its GPU backend would take the memory
  return result


def _entry_lines(r: Result) -> Iterator[str]:
  if "error" in r:
    yield f"FAILED {r['error']}"
  else:
    yield from summary(r)
    if r.get("peer_from"):
      yield f"(peer from {r['peer_from']})"


def _write_partial(path: str, result: Result) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)


