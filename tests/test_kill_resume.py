"""A real SIGKILL of `python -m jmid.train`, then the same command again: same losses as a run
that was never interrupted, and the metrics file has each step once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


def _cmd(workdir, cache):
  overrides = {"run.workdir": workdir, "data.cache_dir": cache, "train.steps": STEPS,
               "train.log_every_steps": 1, "train.eval_every_steps": 0,
               "train.checkpoint_every_steps": 5, "model.d_model": 64, "model.n_layers": 2,
               "model.d_ff": 128, "data.seq_len": 64, "optim.warmup_steps": 5,
               "optim.decay_steps": 10, "mesh.fsdp": 2, "mesh.data": -1}
  return [sys.executable, "-m", "jmid.train", "--config=configs/demo/pretrain.py",
          *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
              JAX_PLATFORMS="cpu")


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)), "a step was logged twice"
  return {r["step"]: r["loss"] for r in records}


@pytest.mark.slow
def test_sigkill_then_same_command_matches_uninterrupted(tmp_path):
  cache = str(tmp_path / "cache")
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(_cmd(straight, cache), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=600)
  proc = subprocess.Popen(_cmd(killed, cache), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(killed, "checkpoints", "10")):
    assert proc.poll() is None and time.time() < deadline, "no checkpoint before the kill"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = _losses(killed)
  assert max(partial) < STEPS  # it really died mid-run
  out = subprocess.run(_cmd(killed, cache), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resumed from" in out.stdout
  a, b = _losses(straight), _losses(killed)
  assert sorted(b) == list(range(1, STEPS + 1))
  assert b == a  # bit for bit on CPU, data order included


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path):
  cache = str(tmp_path / "cache")
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  subprocess.run(_cmd(straight, cache), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=600)
  proc = subprocess.Popen(_cmd(stopped, cache), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(stopped, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 7):
    assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  last = max(_losses(stopped))
  assert last < STEPS
  assert os.path.isdir(os.path.join(stopped, "checkpoints", str(last)))  # saved where it stopped
  subprocess.run(_cmd(stopped, cache), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=600)
  assert _losses(stopped) == _losses(straight)
