"""Two real processes (4 CPU devices each, gloo collectives) through `python -m jmid.train`:
exact resume with per-process data state, a 2-process checkpoint handed to one process, hybrid
meshes across the processes (each standing for a node), a signal to one process stopping both."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_kill_resume import _losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, cache, steps, *extra):
  overrides = {"run.workdir": workdir, "data.cache_dir": cache, "train.steps": steps,
               "train.log_every_steps": 1, "train.eval_every_steps": 0,
               "train.checkpoint_every_steps": 4, "model.d_model": 64, "model.n_layers": 2,
               "model.d_ff": 128, "data.seq_len": 64, "optim.schedule": "constant",
               "optim.warmup_steps": 0, "mesh.fsdp": 2, "mesh.data": -1}
  return [sys.executable, "-m", "jmid.train", "--config=configs/demo/pretrain.py",
          *[f"--config.{k}={v}" for k, v in overrides.items()], *extra]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(n_proc, workdir, cache, steps, *extra):
  """Runs n_proc processes of one job (8 devices in all); returns [(rc, stderr)]."""
  procs = _spawn(n_proc, workdir, cache, steps, *extra)
  return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=600)]]


def _spawn(n_proc, workdir, cache, steps, *extra):
  """Starts n_proc processes of one job (8 devices in all)."""
  port = _free_port()
  procs = []
  for i in range(n_proc):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n_proc}")
    if n_proc > 1:
      env.update(JMID_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JMID_NUM_PROCESSES=str(n_proc),
                 JMID_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(_cmd(str(workdir), str(cache), steps, *extra), cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  return procs


def _read(state_dir):
  """A state saved by any device layout, read onto this process's first device."""
  from etils import epath
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        getattr(meta, "tree", meta))
  return ocp.PyTreeCheckpointer().restore(
      str(state_dir), args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


@pytest.mark.slow
def test_two_processes_resume_exactly_and_hand_over_to_one(tmp_path):
  cache = tmp_path / "cache"
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  runs = _run(2, straight, cache, 8)
  assert all(rc == 0 for rc, _ in runs), runs[0][1][-2000:]
  first = _run(2, resumed, cache, 4)
  assert all(rc == 0 for rc, _ in first), first[0][1][-2000:]
  data = sorted(f for f in os.listdir(resumed / "checkpoints" / "4" / "data") if "process" in f)
  assert data == ["process_0-of-2.json", "process_1-of-2.json"]
  again = _run(2, resumed, cache, 8)  # the same job again, longer: resumes at step 4
  assert all(rc == 0 for rc, _ in again), again[0][1][-2000:]
  assert _losses(resumed) == _losses(straight)  # bit for bit, data order included

  # Each process stands for a node. By default (mesh.dcn_data=0) the data axis crosses them
  # (data=2 across x data=2, fsdp=2 inside); fsdp across the nodes instead (which puts each
  # process's rows at other places of the global batch) trains alike. (Flat and hybrid meshes
  # in one process: tests/test_sharding.py.)
  runs = _run(2, tmp_path / "fsdp", cache, 8, "--config.mesh.dcn_fsdp=2")
  assert all(rc == 0 for rc, _ in runs), runs[0][1][-2000:]
  np.testing.assert_allclose(list(_losses(tmp_path / "fsdp").values()),
                             list(_losses(straight).values()), rtol=1e-5)

  # One process cannot continue the data stream of two: one clear line, nothing touched.
  (rc, err), = _run(1, resumed, cache, 12)
  assert rc == 2 and "Traceback" not in err
  assert "data position of 2 processes, this run has 1" in err.strip().splitlines()[-1]
  # ... but it can take the state over (params and AdamW moments) onto its own mesh.
  step_dir = resumed / "checkpoints" / "8"
  (rc, err), = _run(1, tmp_path / "single", cache, 0, f"--config.init.from_path={step_dir}",
                    "--config.init.load=params+optimizer", "--config.mesh.fsdp=8",
                    "--config.mesh.data=1")
  assert rc == 0, err[-2000:]
  saved = _read(step_dir / "state")
  loaded = _read(tmp_path / "single" / "checkpoints" / "0" / "state")
  for key in ("params", "opt_state"):
    a, b = jax.tree.leaves(saved[key]), jax.tree.leaves(loaded[key])
    assert len(a) == len(b) and len(a) > 3
  for x, y in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(loaded["params"])):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
  """A scheduler preempting one node signals one process: both save the same step (they agree
  through a collective dispatched with the steps) and exit 128 + the signal, and the same
  command resumes exactly."""
  cache, steps = tmp_path / "cache", 16
  straight = _run(2, tmp_path / "straight", cache, steps)
  assert all(rc == 0 for rc, _ in straight), straight[0][1][-2000:]
  stopped = tmp_path / "stopped"
  procs = _spawn(2, stopped, cache, steps)
  metrics, deadline = stopped / "metrics.jsonl", time.time() + 300
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
    assert all(p.poll() is None for p in procs) and time.time() < deadline, "ended too soon"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  ends = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]
  lines = [err.strip().splitlines()[-1] for _, err in ends]
  assert [rc for rc, _ in ends] == [128 + signal.SIGTERM] * 2, ends[0][1][-2000:]
  saved = {line.rsplit("checkpoint saved at step ", 1)[-1].split(";")[0] for line in lines}
  assert len(saved) == 1, lines  # the same step on both
  step = int(saved.pop())
  assert step < steps and "another process of this job got it" in lines[0], lines
  assert sorted(f for f in os.listdir(stopped / "checkpoints" / str(step) / "data")
                if "process" in f) == ["process_0-of-2.json", "process_1-of-2.json"]
  again = _run(2, stopped, cache, steps)
  assert all(rc == 0 for rc, _ in again), again[0][1][-2000:]
  assert _losses(stopped) == _losses(tmp_path / "straight")


def _start_job(tmp_path, extras, env_extra=None):
  """Starts one process per entry of `extras` (its own overrides) as one job; [(rc, stderr)]."""
  port = _free_port()
  procs = []
  for i, extra in enumerate(extras):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JMID_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JMID_NUM_PROCESSES=str(len(extras)),
               JMID_PROCESS_ID=str(i), **(env_extra or {}))
    procs.append(subprocess.Popen(_cmd(str(tmp_path / "w"), str(tmp_path / "cache"), 4, *extra),
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]


@pytest.mark.slow
def test_processes_with_different_configs_all_stop_naming_the_key(tmp_path):
  runs = _start_job(tmp_path, [[], ["--config.optim.lr=0.001"]])
  for rc, err in runs:
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert "run different configs (process(es) 1 differ from process 0" in line, line
    assert "optim.lr" in line, line
  assert not (tmp_path / "w").exists()  # stopped before anything was written


def test_an_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
  """Process 1 of 2 with no process 0 anywhere: XLA would abort with a stack dump after its
  own wait; jmid waits JMID_INIT_TIMEOUT seconds for the port and says what to do."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JMID_NUM_PROCESSES="2", JMID_PROCESS_ID="1",
             JMID_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JMID_INIT_TIMEOUT="3")
  t0 = time.monotonic()
  proc = subprocess.run(_cmd(str(tmp_path / "w"), str(tmp_path / "cache"), 4), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and time.monotonic() - t0 < 60, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "did not answer within 3 s" in lines[0], lines


def test_a_multi_host_tpu_vm_is_detected_from_its_environment(monkeypatch):
  """jax decides at import whether this is a TPU VM (libtpu and chips); here it is not, so the
  test says it is, as jax would, and gives the hosts as GKE and multislice do."""
  from jax._src import cloud_tpu_init
  from jmid import distributed
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1,h2,h3")
  assert distributed.tpu_hosts() == 1 and not distributed._cluster_detected()  # not a TPU VM
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  assert distributed.tpu_hosts() == 4 and distributed._cluster_detected()
  monkeypatch.setenv("MEGASCALE_NUM_SLICES", "2")
  assert distributed.tpu_hosts() == 8
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0")
  monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # one host, no metadata server to ask
  assert distributed.tpu_hosts() == 1 and not distributed._cluster_detected()
