"""Checkpoint throughput: Orbax save and restore of a real train state against a raw write and
read of the same bytes, and how long an async save blocks the training loop.

  python benchmarks/checkpoint.py [--d-model=768 --layers=12 --vocab=32768] [--out=...]

Raw baseline, same run, same disk: every array of the state as one .npy file (written with
fsync, read back with np.load). Orbax: a CheckpointManager save (async, then waited on) and a
restore onto the same shardings. Blocking: the wall time of `manager.save()` itself, and the
extra time of 10 train steps that run while a save is in flight over 10 steps without one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from jmid import config as config_lib  # noqa: E402
from jmid import model as model_lib  # noqa: E402
from jmid import build, sharding  # noqa: E402
from tests.helpers import tiny_configdict  # noqa: E402
from tests.test_sharding import synthetic_batch  # noqa: E402


def _config(d_model: int, layers: int, vocab: int) -> config_lib.Config:
  c = tiny_configdict(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=d_model // 64,
                      n_kv_heads=d_model // 64, d_ff=4 * d_model)
  c.data.seq_len = 128
  c.train.global_batch = 2
  return config_lib.from_configdict(c)


def _raw(state: dict, folder: str) -> tuple[float, float]:
  """(write s, read s) of every array as .npy, fsynced."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
  os.makedirs(folder)
  t0 = time.perf_counter()
  for i, x in enumerate(leaves):
    with open(os.path.join(folder, f"{i}.npy"), "wb") as f:
      np.save(f, x)
      f.flush()
      os.fsync(f.fileno())
  write = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(len(leaves)):
    np.load(os.path.join(folder, f"{i}.npy"))
  return write, time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--d-model", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--out", default="benchmarks/results/checkpoint.json")
  args = ap.parse_args()
  c = _config(args.d_model, args.layers, args.vocab)
  mesh = sharding.make_mesh(c.mesh)
  su = build.setup(c, mesh)
  batch = sharding.to_global(synthetic_batch(c.train.global_batch, c.data.seq_len,
                                          c.model.vocab_size, seed=0), su.batch_sh)
  with jax.set_mesh(mesh), tempfile.TemporaryDirectory(dir=".") as tmp:
    state = su.create_state()
    state, m = su.train_step(state, batch)  # compile
    jax.block_until_ready((state, m))
    gb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9
    raw_w, raw_r = _raw(state, os.path.join(tmp, "raw"))

    def steps(n: int) -> float:
      nonlocal state
      t0 = time.perf_counter()
      for _ in range(n):
        state, m = su.train_step(state, batch)
      jax.block_until_ready((state, m))
      return time.perf_counter() - t0

    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=True)
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(tmp), "ckpt"), options=options)
    t0 = time.perf_counter()
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(
        su.abstract_state)))
    restore_s = time.perf_counter() - t0

    quiet = steps(10)
    t0 = time.perf_counter()
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    call_s = time.perf_counter() - t0
    busy = steps(10)
    manager.wait_until_finished()
    manager.close()
  n_params = model_lib.count_params(state["params"])
  result = {"benchmark": "checkpoint", "params": n_params, "state_gb": gb,
            "raw_write_gb_s": gb / raw_w, "raw_read_gb_s": gb / raw_r,
            "orbax_save_gb_s": gb / save_s, "orbax_restore_gb_s": gb / restore_s,
            "save_over_raw_write": raw_w / save_s, "restore_over_raw_read": raw_r / restore_s,
            "async_save_call_s": call_s, "ten_steps_s": quiet, "ten_steps_during_save_s": busy,
            "loop_blocked_s": call_s + busy - quiet}
  print(f"state {gb:.2f} GB ({n_params / 1e6:.1f}M params + AdamW) on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)")
  print(f"raw write   {gb / raw_w:6.2f} GB/s | orbax save    {gb / save_s:6.2f} GB/s "
        f"({raw_w / save_s:.2f} x raw)")
  print(f"raw read    {gb / raw_r:6.2f} GB/s | orbax restore {gb / restore_s:6.2f} GB/s "
        f"({raw_r / restore_s:.2f} x raw)")
  print(f"async save: save() returns in {call_s * 1e3:.0f} ms; 10 steps take {busy:.2f} s "
        f"during the save vs {quiet:.2f} s without: the loop is held up "
        f"{(call_s + busy - quiet) * 1e3:.0f} ms in all")
  write_result(args.out, result)


if __name__ == "__main__":
  main()
