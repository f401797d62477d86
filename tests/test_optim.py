"""Schedules at their boundaries, and which leaves get weight decay."""

import dataclasses

import jax
import numpy as np
import pytest

from jmid import model as model_lib
from jmid import optim
from tests.helpers import tiny_config


def _cfg(**kw):
  return dataclasses.replace(tiny_config().optim, **{"lr": 1.0, "end_lr": 0.0, **kw})


def _at(cfg, total, steps):
  fn = optim.schedule(cfg, total)
  return [float(fn(s)) for s in steps]


def test_constant_with_warmup():
  assert _at(_cfg(schedule="constant", warmup_steps=10), 100, [0, 5, 10, 99]) == \
      pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_cosine_boundaries():
  v = _at(_cfg(schedule="cosine", warmup_steps=10, end_lr=0.1), 110, [0, 10, 60, 110])
  assert v == pytest.approx([0.0, 1.0, 0.55, 0.1], abs=1e-6)


def test_linear_boundaries():
  v = _at(_cfg(schedule="linear", warmup_steps=0), 100, [0, 50, 100])
  assert v == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("cosine", 0.5),
                                       ("1-sqrt", 1 - np.sqrt(0.5))])
def test_wsd_warmup_stable_decay(shape, mid):
  cfg = _cfg(schedule="wsd", warmup_steps=10, decay_steps=20, decay_shape=shape)
  # warmup 0..10, stable 10..80, decay 80..100 to end_lr=0
  v = _at(cfg, 100, [0, 5, 10, 50, 80, 90, 100])
  assert v == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, mid, 0.0], abs=1e-6)


def test_wsd_default_decay_is_a_fifth_and_reaches_end_lr():
  cfg = _cfg(schedule="wsd", warmup_steps=0, end_lr=0.25)
  v = _at(cfg, 100, [79, 80, 100])
  assert v == pytest.approx([1.0, 1.0, 0.25], abs=1e-6)


def test_decay_mask_skips_norms_biases_and_embeddings():
  cfg = tiny_config(qkv_bias=True).model
  kinds = model_lib.decay_kinds(cfg)  # marked where the model makes each parameter
  assert jax.tree.structure(kinds) == jax.tree.structure(model_lib.init_params(cfg, 0))
  mask = optim.decay_mask(kinds, decay_embeddings=False)
  assert mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["w_down"]
  assert not mask["blocks"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
  assert not mask["blocks"]["attn"]["bq"] and not mask["embed"] and not mask["lm_head"]
  with_emb = optim.decay_mask(kinds, decay_embeddings=True)
  assert with_emb["embed"] and with_emb["lm_head"] and not with_emb["blocks"]["attn"]["bk"]
