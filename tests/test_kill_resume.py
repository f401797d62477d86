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


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """(cache dir, losses of the uninterrupted run), shared by the interruption tests."""
  tmp = tmp_path_factory.mktemp("straight")
  cache, workdir = str(tmp / "cache"), str(tmp / "run")
  subprocess.run(_cmd(workdir, cache), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=600)
  return cache, _losses(workdir)


def _start_and_wait(workdir, cache, ready):
  """Starts the CLI and returns it once ready() holds (it must still be running)."""
  proc = subprocess.Popen(_cmd(workdir, cache), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not ready():
    assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
    time.sleep(0.05)
  return proc


def _finish(workdir, cache):
  out = subprocess.run(_cmd(workdir, cache), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resumed from" in out.stdout


@pytest.mark.slow
def test_sigkill_then_same_command_matches_uninterrupted(tmp_path, straight):
  cache, expected = straight
  killed = str(tmp_path / "killed")
  proc = _start_and_wait(killed, cache,
                         lambda: os.path.isdir(os.path.join(killed, "checkpoints", "10")))
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert max(_losses(killed)) < STEPS  # it really died mid-run
  _finish(killed, cache)
  losses = _losses(killed)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses == expected  # bit for bit on CPU, data order included


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_signal_saves_at_the_next_step_and_exits_128_plus_signal(tmp_path, straight,
                                                                           signum):
  cache, expected = straight
  stopped = str(tmp_path / "stopped")
  metrics = os.path.join(stopped, "metrics.jsonl")
  proc = _start_and_wait(stopped, cache, lambda: os.path.exists(metrics) and
                         len(open(metrics).readlines()) >= 7)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signum, err[-2000:]  # a scheduler must not see "done"
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith(f"jmid: stopped by {signum.name}; checkpoint "
                                                 "saved at step")
  last = max(_losses(stopped))
  assert last < STEPS
  assert os.path.isdir(os.path.join(stopped, "checkpoints", str(last)))  # saved where it stopped
  _finish(stopped, cache)
  assert _losses(stopped) == expected
