"""Tokens/s of a 4-source scheduled mixture packed to 4096, in one process.

  python benchmarks/data_pipeline.py [--seq-len=4096] [--batch=8] [--seconds=10]
                                     [--out=benchmarks/results/data_pipeline.json]

Four token-file sources (~8M tokens each, document lengths drawn from a log-normal like web
text) are written to a temp dir; then, in the same run:
  raw       reading the same documents straight from the memory maps (the ceiling),
  pipeline  jmid's train_iterator: per-source shuffle, split, concat-then-split packing, a
            linearly blended 4-stage mixture schedule, shifting and batching,
and the ratio pipeline / raw. Target: at least 1M tokens/s per process (an H100 training a
1B-parameter model consumes under 100k).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jmid.config import DataConfig, SourceConfig  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from jmid.data import pipeline  # noqa: E402
from jmid.data.tokenfile import TokenFile, write_token_file  # noqa: E402

NAMES = ("web", "code", "math", "chat")
VOCAB = 128_256  # Llama 3's: uint32 tokens on disk
MIXTURE = ((0, {"web": 0.70, "code": 0.15, "math": 0.10, "chat": 0.05}),
           (100, {"web": 0.60, "code": 0.20, "math": 0.15, "chat": 0.05}),
           (200, {"web": 0.50, "code": 0.25, "math": 0.20, "chat": 0.05}),
           (300, {"web": 0.40, "code": 0.30, "math": 0.25, "chat": 0.05}))


def make_sources(root: str, tokens_per_source: int) -> dict[str, str]:
  rng = np.random.default_rng(0)
  paths = {}
  for name in NAMES:
    lengths, total = [], 0
    while total < tokens_per_source:
      n = int(min(max(rng.lognormal(6.0, 1.2), 8), 60_000))  # median ~400 tokens, long tail
      lengths.append(n)
      total += n
    docs = (rng.integers(0, VOCAB, n, dtype=np.uint32) for n in lengths)
    paths[name] = os.path.join(root, name)
    write_token_file(paths[name], docs, VOCAB)
  return paths


def raw_tokens_per_sec(paths: dict[str, str], seconds: float) -> float:
  files = [TokenFile(p) for p in paths.values()]
  n, t0, i = 0, time.perf_counter(), 0
  while time.perf_counter() - t0 < seconds:
    for tf in files:
      doc = tf[i % len(tf)]
      n += int(np.asarray(doc, dtype=np.int32).sum() >= 0) * len(doc)  # touch every token
    i += 1
  return n / (time.perf_counter() - t0)


def pipeline_tokens_per_sec(paths: dict[str, str], seq_len: int, batch: int,
                            seconds: float) -> tuple[float, dict[str, float]]:
  cfg = DataConfig(demo=False, cache_dir="", seq_len=seq_len, eval_fraction=0.01,
                   packing="concat", shuffle=True, tokenizer="byte",
                   sources={n: SourceConfig(path=p) for n, p in paths.items()},
                   mixture=MIXTURE, mixture_interpolation="linear")
  it = pipeline.train_iterator(cfg, pipeline.open_sources(cfg), batch_size=batch, seed=0)
  next(it)  # first batch: opening and the first documents
  counts = np.zeros(len(NAMES))
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    n += b["inputs"].size
    counts += np.bincount(b["source"], minlength=len(NAMES)) * seq_len
  return n / (time.perf_counter() - t0), dict(zip(NAMES, (counts / counts.sum()).tolist()))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--seq-len", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seconds", type=float, default=10.0)
  ap.add_argument("--tokens-per-source", type=int, default=8_000_000)
  ap.add_argument("--out", default="benchmarks/results/data_pipeline.json")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    paths = make_sources(tmp, args.tokens_per_source)
    raw = raw_tokens_per_sec(paths, args.seconds)
    tps, shares = pipeline_tokens_per_sec(paths, args.seq_len, args.batch, args.seconds)
  result = {"benchmark": "data_pipeline", "seq_len": args.seq_len, "batch": args.batch,
            "sources": len(NAMES), "raw_tokens_per_s": raw, "pipeline_tokens_per_s": tps,
            "pipeline_over_raw": tps / raw, "realised_shares": shares}
  print(f"raw memmap read   : {raw / 1e6:8.2f} M tokens/s")
  print(f"4-source pipeline : {tps / 1e6:8.2f} M tokens/s  ({tps / raw:.2f} x raw; "
        f"target >= 1.00 M)")
  print("realised shares   : " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
  write_result(args.out, result)


if __name__ == "__main__":
  main()
