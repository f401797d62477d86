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
