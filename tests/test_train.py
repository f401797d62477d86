"""End to end on the demo corpus: workdir contents, and exact resume (2N == N + resume to 2N)."""

import glob
import json
import os

import numpy as np
import pytest

from jmid import train
from tests.helpers import run_configdict, tensorboard_scalars


def _cfg(workdir, cache_dir, steps=8):
  c = run_configdict(workdir, cache_dir, steps)
  c.optim.schedule, c.optim.warmup_steps, c.optim.decay_steps = "wsd", 2, 3
  c.train.eval_every_steps = 4
  c.train.eval_batches = 2
  return c


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


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
  # realised token shares of the log interval; the demo's default mixture leaves chat at 0
  shares = {k: v for k, v in records[-1].items() if k.startswith("mix/")}
  assert set(shares) == {"mix/code", "mix/math", "mix/text", "mix/chat"}
  assert sum(shares.values()) == pytest.approx(1.0) and shares["mix/chat"] == 0.0
  # bits per byte: byte tokens, so about loss / ln 2 (EOS tokens carry no bytes)
  bpb, loss = records[3]["eval/chat/bpb"], records[3]["eval/chat/loss"]
  assert loss / np.log(2) < bpb < 1.3 * loss / np.log(2)
  scalars = tensorboard_scalars(w / "tensorboard")  # the same numbers as metrics.jsonl
  assert scalars["loss"] == {r["step"]: pytest.approx(r["loss"]) for r in records}
  assert scalars["eval/code/loss"] == {r["step"]: pytest.approx(r["eval/code/loss"])
                                       for r in records if "eval/code/loss" in r}
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(w / "checkpoints" / "*"))
                 if os.path.basename(p).isdigit())
  assert steps == [3, 6]
  meta = json.loads((w / "checkpoints" / "6" / "meta" / "metadata").read_text())
  assert meta["step"] == 6 and meta["model"]["n_layers"] == 2
  assert meta["version"] == 2 and "model" not in meta["config"]  # the spec stored once
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


@pytest.mark.slow  # about 45 s: the fast lane keeps under 20 minutes
def test_resume_from_a_mid_run_async_checkpoint(tmp_path, cache_dir):
  """Checkpoint 3 was written asynchronously while the loop went on: it must hold step 3."""
  import shutil
  straight = tmp_path / "straight"
  train.train(_cfg(straight, cache_dir, steps=8))
  resumed = tmp_path / "from3"
  shutil.copytree(straight, resumed)
  for step in ("6", "8"):
    shutil.rmtree(resumed / "checkpoints" / step)
  train.train(_cfg(resumed, cache_dir, steps=8))
  a, b = _losses(straight), _losses(resumed)
  assert sorted(b) == list(range(1, 9))
  for step in range(4, 9):
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_init_from_path_loads_params_with_a_fresh_optimizer(tmp_path, cache_dir):
  src = tmp_path / "src"
  train.train(_cfg(src, cache_dir, steps=6))
  c = _cfg(tmp_path / "dst", cache_dir, steps=0)
  c.optim.warmup_steps, c.init.from_path = 0, str(src)
  train.train(c)
  saved, loaded = _raw_state(src / "checkpoints" / "6"), _raw_state(tmp_path / "dst" /
                                                                   "checkpoints" / "0")
  for x, y in zip(jax_leaves(saved["params"]), jax_leaves(loaded["params"])):
    np.testing.assert_array_equal(x, y)
  assert int(loaded["step"]) == 0
  for mu in jax_leaves(loaded["opt_state"]):
    assert not np.any(mu)  # fresh Adam moments and count
  meta = json.loads((tmp_path / "dst" / "checkpoints" / "0" / "meta" / "metadata").read_text())
  assert meta["step"] == 0
  # a 0-step run evaluates what it loaded: the source's own final eval, on the same eval sets
  (ours,), theirs = _records(tmp_path / "dst"), _records(src)[-1]
  assert ours["step"] == 0 and ours["init"].startswith("params from")
  for key in ("eval/loss", "eval/code/loss", "eval/text/loss"):
    assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_init_from_a_path_that_is_not_a_checkpoint(tmp_path, cache_dir):
  from jmid.errors import UserError
  c = _cfg(tmp_path / "dst", cache_dir, steps=6)
  c.init.from_path = str(tmp_path)
  with pytest.raises(UserError, match="init.from_path"):
    train.train(c)


def _raw_state(step_dir):
  """The saved state read back by Orbax alone (no jmid code), as numpy arrays."""
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(str(step_dir / "state"))


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
