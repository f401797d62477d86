"""End to end on the demo corpus: workdir contents, and exact resume (2N == N + resume to 2N)."""

import glob
import json
import os

import numpy as np
import pytest

from jmid import train
from tests.helpers import tiny_configdict


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def _cfg(workdir, cache_dir, steps=8):
  c = tiny_configdict()
  c.model.vocab_size = 384  # the byte tokenizer of the demo corpus needs 258 ids
  c.run.workdir = str(workdir)
  c.data.cache_dir = cache_dir
  c.mesh.fsdp = 2  # a real mesh: 4 x fsdp 2 over the 8 fake devices
  c.mesh.data = -1
  c.optim.schedule, c.optim.warmup_steps, c.optim.decay_steps = "wsd", 2, 3
  c.train.steps = steps
  c.train.log_every_steps = 1
  c.train.eval_every_steps = 4
  c.train.eval_batches = 2
  c.train.checkpoint_every_steps = 3
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_run_leaves_config_metrics_tensorboard_checkpoints(tmp_path, cache_dir):
  out = train.train(_cfg(tmp_path / "w", cache_dir, steps=6))
  w = tmp_path / "w"
  assert json.loads((w / "config.json").read_text())["model"]["d_model"] == 32
  records = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "lr", "tokens", "tokens_per_sec", "grad_norm"):
    assert key in records[-1]
  assert records[-1]["tokens"] == 6 * 8 * 16
  assert "eval/loss" in records[3] and "eval/code/loss" in records[3]
  assert glob.glob(str(w / "tensorboard" / "events.out.tfevents.*"))
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(w / "checkpoints" / "*"))
                 if os.path.basename(p).isdigit())
  assert steps == [3, 6]
  meta = json.loads((w / "checkpoints" / "6" / "meta" / "metadata").read_text())
  assert meta["step"] == 6 and meta["model"]["n_layers"] == 2
  assert out["step"] == 6 and np.isfinite(out["eval/loss"])


def test_resume_gives_the_same_losses_as_straight(tmp_path, cache_dir):
  train.train(_cfg(tmp_path / "straight", cache_dir, steps=8))
  first = train.train(_cfg(tmp_path / "resumed", cache_dir, steps=8), stop_after=4)
  assert first["step"] == 4
  train.train(_cfg(tmp_path / "resumed", cache_dir, steps=8))  # same command again
  straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
  assert sorted(resumed) == list(range(1, 9))  # no duplicated or missing steps
  for step in range(1, 9):
    assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
