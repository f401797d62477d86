"""Tiny real configs shared by tests."""

from __future__ import annotations

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


def run_configdict(workdir: object, cache_dir: str, steps: int) -> ConfigDict:
  """A tiny model on the demo corpus over a real mesh (data 4 x fsdp 2 of the 8 fake devices),
  logging every step and checkpointing every 3: what the end-to-end tests run."""
  c = tiny_configdict()
  c.model.vocab_size = 384  # the byte tokenizer of the demo corpus needs 258 ids
  c.run.workdir = str(workdir)
  c.data.cache_dir = cache_dir
  c.mesh.fsdp, c.mesh.data = 2, -1
  c.train.steps = steps
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 3
  return c
