"""Tiny real configs shared by tests."""

from __future__ import annotations

import contextlib
import pathlib
import struct
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import base
from jmid import config as config_lib


def tiny_configdict(**model: object) -> ConfigDict:
  c = base.get_config()
  c.model.vocab_size = 64
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 64
  for k, v in model.items():
    setattr(c.model, k, v)
  c.data.demo = True
  c.data.seq_len = 16
  c.optim.warmup_steps = 0
  c.train.steps = 10
  c.train.global_batch = 8
  return c


def tiny_config(**model: object) -> config_lib.Config:
  return config_lib.from_configdict(tiny_configdict(**model))


def run_configdict(workdir: object, cache_dir: str, steps: int, evals: bool = True
                   ) -> ConfigDict:
  """A tiny model on the demo corpus over a real mesh (data 4 x fsdp 2 of the 8 fake devices),
  logging every step and checkpointing every 3: what the end-to-end tests run. evals=False
  leaves out the periodic eval (one eval batch, at the last step only): less to compile."""
  c = tiny_configdict()
  c.model.vocab_size = 384  # the byte tokenizer of the demo corpus needs 258 ids
  c.run.workdir = str(workdir)
  c.data.cache_dir = cache_dir
  c.mesh.fsdp, c.mesh.data = 2, -1
  c.train.steps = steps
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 3
  if not evals:
    c.train.eval_every_steps = 0
    c.train.eval_batches = 1
  return c


@contextlib.contextmanager
def small_fs(path: pathlib.Path, size_kb: int, readonly: bool = False) -> Iterator[pathlib.Path]:
  """A real tmpfs of `size_kb` at `path` (a full disk once filled; read-only if asked): what a
  full or read-only volume does to a command, without faking errors. Needs root (CI is)."""
  path.mkdir(parents=True, exist_ok=True)
  opts = f"size={size_kb}k" + (",ro" if readonly else "")
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: pathlib.Path) -> None:
  """Fills the filesystem holding `path` to the last byte."""
  with open(path / "filler", "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError:
      pass


def tensorboard_scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} read back from the TFRecord event files in `logdir`, framing checked
  (length, data, two CRCs): what TensorBoard itself would load."""
  from tensorboardX.proto.event_pb2 import Event
  out: dict[str, dict[int, float]] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = Event.FromString(data[at + 12:at + 12 + n])
      at += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
    assert at == len(data), f"{path}: a torn record"
  return out


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Two documents per row plus padding, in the batch format of DESIGN.md."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  cut, pad = seq // 3, seq - 2
  seg = np.ones((batch, seq + 1), np.int32)
  seg[:, cut:] = 2
  seg[:, pad:] = 0
  pos = np.where(seg == 2, np.arange(seq + 1) - cut, np.arange(seq + 1)).astype(np.int32)
  pos[:, pad:] = 0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1],
          "positions": pos[:, :-1],
          "loss_mask": ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)).astype(np.int32)}
