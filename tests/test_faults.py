"""Faults and careless input through `python -m jmid.train`: each case asserts the exit code, one
line and no traceback, and the files before and after (nothing the user had is lost)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jmid import build
from tests.helpers import fill, run_configdict, small_fs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.vocab_size": 384, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.d_ff": 64, "data.seq_len": 32, "train.global_batch": 8,
        "optim.warmup_steps": 0, "optim.decay_steps": 2, "train.log_every_steps": 1,
        "train.checkpoint_every_steps": 3, "train.eval_every_steps": 0, "train.eval_batches": 1}


def cli(workdir, cache, steps=6, **overrides):
  """The command of a tiny demo run, as a user types it."""
  opts = {**TINY, "run.workdir": workdir, "data.cache_dir": cache, "train.steps": steps,
          **overrides}
  return [sys.executable, "-m", "jmid.train", "--config=configs/demo/pretrain.py",
          *[f"--config.{k}={v}" for k, v in opts.items()]]


def run(cmd, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_line(proc, code, expected):
  """Exit `code`, no traceback, and the last stderr line is jmid's own naming `expected`."""
  assert proc.returncode == code, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("jmid: ") and expected in last, last


def tree_sums(path) -> dict[str, str]:
  """Every file under `path` -> md5 (the lock file aside: it is the only thing a run may add)."""
  out = {}
  for d, _, files in os.walk(path):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.md5(fh.read()).hexdigest()
  return out


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
  """A 9-step run, uninterrupted: the reference for every resume below."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  proc = run(cli(workdir, cache, steps=9))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_folders_that_are_not_runs_are_refused_untouched(tmp_path, cache):
  hf = tmp_path / "exported"
  hf.mkdir()
  (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
  (hf / "model.safetensors").write_bytes(b"weights")
  before = tree_sums(hf)
  one_line(run(cli(hf, cache)), 2, "is not a jmid run (a Hugging Face model folder)")
  assert tree_sums(hf) == before and sorted(os.listdir(hf)) == ["config.json",
                                                                "model.safetensors"]
  one_line(run(cli("", cache)), 2, "run.workdir is empty")


def test_a_model_that_cannot_fit_is_refused_before_allocating(tmp_path, cache):
  big = {"model.d_model": 6144, "model.n_layers": 36, "model.d_ff": 24576, "model.n_heads": 48,
         "model.n_kv_heads": 8, "model.vocab_size": 128256}  # ~17B params
  proc = run(cli(tmp_path / "big", cache, **big))
  one_line(proc, 2, "GiB per device for one train step but the device has")
  assert not (tmp_path / "big").exists()
  one_line(run(cli(tmp_path / "long", cache, **{"data.seq_len": 10**9})), 2,
           "data.seq_len=1000000000: must be a positive integer of at most")


def test_resume_with_changed_config_is_named_or_refused(tmp_path, cache, straight):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  before = tree_sums(workdir)
  proc = run(cli(workdir, cache, steps=9, **{"data.seq_len": 64}))
  one_line(proc, 2, "with a changed data.seq_len: 32 -> 64 would not continue the same data")
  assert tree_sums(workdir) == before  # config.json and checkpoints untouched
  proc = run(cli(workdir, cache, steps=10, **{"optim.clip_norm": 0.5}))
  assert proc.returncode == 0, proc.stderr[-3000:]
  first = proc.stdout.splitlines()[0]
  assert "config changed since the checkpoint: optim.clip_norm: 1.0 -> 0.5; train.steps: " \
         "9 -> 10" in first, first
  with open(workdir / "metrics.jsonl") as f:
    record = [json.loads(l) for l in f if json.loads(l)["step"] == 10][0]
  assert "optim.clip_norm: 1.0 -> 0.5" in record["init/notes"][0]


@pytest.mark.slow  # about 45 s: the fast lane keeps under 20 minutes
def test_resume_step_rolls_back_keeps_newer_and_trains_on(tmp_path, cache, straight):
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 10, "lo')  # a torn last line, as a crash mid-write leaves
  proc = run(cli(workdir, cache, steps=9, **{"train.resume_step": 3}))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "rolled back to step 3: checkpoints 6, 9 moved to" in proc.stdout.splitlines()[0]
  aside = [d for d in os.listdir(workdir / "checkpoints") if d.startswith("rolled-back")]
  assert len(aside) == 1 and {"6", "9"} <= set(os.listdir(workdir / "checkpoints" / aside[0]))
  assert losses(workdir) == losses(straight)  # steps 4..9 replayed exactly, torn line gone
  again = run(cli(workdir, cache, steps=9, **{"train.resume_step": 3}))  # a requeued job
  assert again.returncode == 0 and "was applied before" in again.stdout.splitlines()[0]
  one_line(run(cli(workdir, cache, steps=9, **{"train.resume_step": 4})), 2,
           "train.resume_step=4: no such checkpoint")


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, cache):
  workdir = tmp_path / "nan"
  proc = run(cli(workdir, cache, steps=30, **{"optim.lr": 1e37, "optim.warmup_steps": 4,
                                              "train.max_skipped_steps": 5}))
  one_line(proc, 2, "5 steps in a row up to step")
  assert "the last finite loss was" in proc.stderr and "train.resume_step=N" in proc.stderr
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert sum(r["skipped_steps"] for r in records) >= 1 and records[0]["skipped_steps"] == 0
  for step in os.listdir(workdir / "checkpoints"):  # every checkpoint left is finite
    state = ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / step / "state"))
    for leaf in jax_leaves(state):
      assert np.all(np.isfinite(leaf)), step


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree) if np.asarray(x).dtype.kind == "f"]


def test_skipped_step_leaves_the_state_unchanged(tmp_path):
  """In-process: a step whose update overflows changes nothing but the step counter."""
  import jax
  from jmid import config as config_lib
  from jmid import sharding
  c = run_configdict(tmp_path / "r", str(tmp_path / "cache"), 1)
  c.optim.lr, c.optim.warmup_steps, c.mesh.fsdp, c.mesh.data = 1e38, 0, 1, 1
  cfg = config_lib.from_configdict(c)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  su = build.setup(cfg, mesh)
  from tests.helpers import synthetic_batch
  with jax.set_mesh(mesh):
    state = su.create_state()
    before = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state")})
    state, m = su.train_step(state, sharding.to_global(synthetic_batch(8, 16, 384),
                                                       su.batch_sh))
  assert float(m["skipped"]) == 1.0 and int(state["step"]) == 1
  after = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state")})
  jax.tree.map(np.testing.assert_array_equal, after, before)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_resumes_exactly_from_the_one_before(tmp_path, cache,
                                                                         straight):
  workdir = tmp_path / "run"  # the reference run, with its last checkpoint (9) half-written
  shutil.copytree(straight, workdir)
  data = workdir / "checkpoints" / "9" / "state" / "ocdbt.process_0" / "d"
  for f in os.listdir(data):
    os.truncate(data / f, os.path.getsize(data / f) // 2)
  damaged = tree_sums(workdir / "checkpoints" / "9")
  proc = run(cli(workdir, cache, steps=9))
  assert proc.returncode == 0, proc.stderr[-3000:]
  first = proc.stdout.splitlines()[0]
  assert f"checkpoint {workdir}/checkpoints/9 is damaged (" in first, first
  assert "resumed from step 6 instead" in first, first
  aside = [d for d in os.listdir(workdir / "checkpoints") if d.startswith("damaged-")]
  assert len(aside) == 1, os.listdir(workdir / "checkpoints")
  assert tree_sums(workdir / "checkpoints" / aside[0] / "9") == damaged  # kept, as it was
  assert losses(workdir) == losses(straight)  # steps 7-9 again, bit for bit
  assert sorted(ocp.CheckpointManager(workdir / "checkpoints").all_steps()) == [3, 6, 9]


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_run_restarts(tmp_path, cache):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  first = subprocess.Popen(cli(workdir, cache, steps=100000), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "3").is_dir():
      assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
      time.sleep(0.1)
    lock = (workdir / "jmid.lock").read_text()
    second = run(cli(workdir, cache, steps=100000))
    one_line(second, 2, f"is in use by another run (pid {first.pid} on")
    assert (workdir / "jmid.lock").read_text() == lock  # the holder's lock untouched
    assert first.poll() is None  # and the first run goes on
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  assert (workdir / "jmid.lock").exists()  # a kill -9 leaves its lock behind...
  proc = run(cli(workdir, cache, steps=6))
  assert proc.returncode == 0, proc.stderr[-3000:]  # ...which never blocks the restart
  assert f"took over the stale lock of pid {first.pid}" in proc.stdout.splitlines()[0]
  assert not (workdir / "jmid.lock").exists()


@pytest.mark.slow
def test_signals_at_any_moment_of_start_up_leave_nothing(tmp_path, cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  # from 0.5 s: before that the process is in Python's own start-up, where no program can
  # catch a signal yet; then imports, corpus, compile, restore
  for i, (delay, signum) in enumerate([(0.5, signal.SIGINT), (2.0, signal.SIGTERM),
                                       (4.0, signal.SIGINT), (7.0, signal.SIGINT)]):
    workdir = tmp_path / f"run{i}"
    proc = subprocess.Popen(cli(workdir, cache, steps=100000), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    started = "params |" in out  # it may have reached the loop on a fast machine
    assert proc.returncode == 128 + signum, (delay, err[-2000:])
    assert "Traceback" not in err and "Segmentation" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"jmid: stopped by {signum.name}")
    if not started:
      assert not workdir.exists(), (delay, os.listdir(workdir))
  proc = run(cli(tmp_path / "run0", cache, steps=3))  # the next run starts normally
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_full_and_read_only_disks(tmp_path, cache, straight):
  with small_fs(tmp_path / "ro", 1024, readonly=True) as ro:
    one_line(run(cli(ro / "run", cache)), 2, "read-only filesystem")
  with small_fs(tmp_path / "disk", 16 * 1024) as disk:
    workdir = disk / "run"  # the reference run, stopped after its checkpoint of step 3
    shutil.copytree(straight, workdir)
    for step in ("6", "9"):
      shutil.rmtree(workdir / "checkpoints" / step)
    good = tree_sums(workdir / "checkpoints" / "3")
    fill(disk)  # then leave room for the logs, not for a checkpoint
    os.truncate(disk / "filler", os.path.getsize(disk / "filler") - 96 * 1024)
    proc = run(cli(workdir, cache, steps=60))
    one_line(proc, 2, "no space left on the device")
    assert "step 3 is the last good checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) < 20, proc.stderr  # not hundreds of lines
    assert max(losses(workdir)) < 12  # it stopped soon after the failed save at step 6
    assert tree_sums(workdir / "checkpoints" / "3") == good
    os.remove(disk / "filler")
    proc = run(cli(workdir, cache, steps=9))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(workdir) == losses(straight)  # the resume after freeing space is exact
