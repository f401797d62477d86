"""The demo stages chain: each validates, and each starts from a checkpoint the previous stage
really keeps (a schedule or keep_checkpoints edit must not silently break the chain)."""

import dataclasses
import os

import pytest

from configs.demo import longctx, midtrain, pretrain, sft
from jmid import config as config_lib
from jmid import optim


def test_each_demo_stage_validates_and_points_at_the_previous_one():
  pre, mid, post = (config_lib.from_configdict(m.get_config()) for m in (pretrain, midtrain, sft))
  assert pre.init.from_path == ""
  assert os.path.dirname(os.path.dirname(mid.init.from_path)) == pre.run.workdir
  assert post.init.from_path == mid.run.workdir
  assert mid.model == pre.model == post.model
  ext = config_lib.from_configdict(longctx.get_config())
  assert len({s.run.seed for s in (pre, mid, post, ext)}) == 1  # one eval split
  # mid-train and SFT each read in their own order (the context extension measured better in
  # the pretrain's: configs/demo/longctx.py)
  orders = [s.run.seed if s.data.shuffle_seed == -1 else s.data.shuffle_seed
            for s in (pre, mid, post)]
  assert len(set(orders)) == 3, orders


def test_midtrain_branches_from_a_kept_checkpoint_at_the_peak_lr():
  pre = config_lib.from_configdict(pretrain.get_config())
  mid = config_lib.from_configdict(midtrain.get_config())
  step = int(os.path.basename(mid.init.from_path))
  every, keep = pre.train.checkpoint_every_steps, pre.train.keep_checkpoints
  saved = list(range(every, pre.train.steps, every)) + [pre.train.steps]
  assert step in saved[-keep:]  # still on disk when the pretrain run has finished
  assert mid.optim.lr_from_checkpoint
  lr = float(optim.schedule(pre.optim, pre.train.steps)(step))
  assert lr == pytest.approx(pre.optim.lr, rel=1e-6)  # the stable phase, before the decay


def test_longctx_extends_the_pretrain_model_4x_from_a_kept_checkpoint():
  pre = config_lib.from_configdict(pretrain.get_config())
  ext = config_lib.from_configdict(longctx.get_config())
  step = int(os.path.basename(ext.init.from_path))
  every, keep = pre.train.checkpoint_every_steps, pre.train.keep_checkpoints
  assert step in (list(range(every, pre.train.steps, every)) + [pre.train.steps])[-keep:]
  assert ext.data.seq_len == 4 * pre.data.seq_len
  assert ext.model.rope_theta > pre.model.rope_theta  # the only model change: no params change
  assert ext.model == dataclasses.replace(pre.model, rope_theta=ext.model.rope_theta)
  assert set(ext.train.passkey_lengths) == {pre.data.seq_len, ext.data.seq_len}
  assert ext.optim.lr_from_checkpoint and ext.data.mixture[-1][1]["retrieval"] > 0
