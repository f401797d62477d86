"""Tokens/s of the demo model, and what the full loop adds over the bare jitted step.

  python benchmarks/train_step.py [--steps=60] [--out=benchmarks/results/train_step.json]
                                  [--config=configs/demo/pretrain.py] [--set key=value ...]

Bare step: the jitted, donated train_step on one batch already on the device, nothing else.
Full loop: jmid.train.train() on the same config (data pipeline, host->device copies, metrics,
async checkpoints every 20 steps), timed from its own log intervals after the first (compile)
interval, eval time excluded. Both run in this process, on this machine, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from jmid import config as config_lib  # noqa: E402
from jmid import build, configfile, sharding, train  # noqa: E402
from jmid.data import pipeline  # noqa: E402


def _load(path: str, sets: list[str], workdir: str, steps: int):
  """The config as the CLI would build it (same override parsing), then benchmark settings."""
  cfg = configfile.parse(["benchmark", f"--config={path}", *[f"--config.{s}" for s in sets]])
  cfg.run.workdir = workdir
  cfg.train.steps = steps
  cfg.train.log_every_steps = 10
  cfg.train.eval_every_steps = 0
  cfg.train.checkpoint_every_steps = 20
  cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, steps // 4)
  cfg.optim.decay_steps = min(cfg.optim.decay_steps, steps // 4)
  return cfg


def bare_step_seconds(c: config_lib.Config, steps: int) -> float:
  mesh = sharding.make_mesh(c.mesh)
  su = build.setup(c, mesh)
  srcs = pipeline.open_sources(c.data)
  it = pipeline.train_iterator(c.data, srcs, batch_size=c.train.global_batch, seed=0)
  with jax.set_mesh(mesh):
    state = su.create_state()
    batch = next(it)
    batch.pop("source")
    batch = sharding.to_global(batch, su.batch_sh)
    state, m = su.train_step(state, batch)  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = su.train_step(state, batch)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t0) / steps


def loop_step_seconds(cfg, tokens_per_step: int) -> float:
  train.train(cfg)
  with open(os.path.join(cfg.run.workdir, "metrics.jsonl")) as f:
    tps = [r["tokens_per_sec"] for r in map(json.loads, f) if r.get("tokens_per_sec")]
  return tokens_per_step / statistics.median(tps[1:] if len(tps) > 2 else tps)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/demo/pretrain.py")
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--set", nargs="*", default=[], help="overrides like model.d_model=128")
  ap.add_argument("--out", default="benchmarks/results/train_step.json")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    cfg = _load(args.config, args.set, os.path.join(tmp, "run"), args.steps)
    c = config_lib.from_configdict(cfg)
    tokens_per_step = c.train.global_batch * c.data.seq_len
    bare = bare_step_seconds(c, args.steps)
    loop = loop_step_seconds(cfg, tokens_per_step)
  result = {
      "benchmark": "train_step", "config": args.config,
      "overrides": args.set, "tokens_per_step": tokens_per_step,
      "bare_step_s": bare, "loop_step_s": loop,
      "bare_tokens_per_s": tokens_per_step / bare, "loop_tokens_per_s": tokens_per_step / loop,
      "loop_over_bare": loop / bare,
  }
  print(f"device {jax.devices()[0].device_kind} x{jax.device_count()} | jax {jax.__version__}")
  print(f"bare jitted step : {bare * 1e3:8.1f} ms  {tokens_per_step / bare:10,.0f} tok/s")
  print(f"full train loop  : {loop * 1e3:8.1f} ms  {tokens_per_step / loop:10,.0f} tok/s")
  print(f"loop / bare      : {loop / bare:8.3f}  (loop adds {100 * (loop / bare - 1):+.1f}%)")
  write_result(args.out, result)


if __name__ == "__main__":
  main()
