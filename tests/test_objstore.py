"""Runs whose workdir is a gs:// bucket, on a local GCS emulator (tests/gcs_emulator.py):
checkpoints through Orbax/TensorStore, metrics, config, lock and TensorBoard through jmid/fs.py.
A run there resumes exactly, holds its lock, and hands its checkpoints to the next stage."""

import json
import os
import subprocess
import sys

import pytest

from tests import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "jmid-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(environment for subprocesses, a local data cache); this process uses the emulator too."""
  proc, env = gcs_emulator.start(BUCKET)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield dict(os.environ, JAX_PLATFORMS="cpu"), str(tmp_path_factory.mktemp("cache"))
  finally:
    proc.kill()
    for k, v in saved.items():
      os.environ.pop(k) if v is None else os.environ.update({k: v})


def _train(gcs, workdir, steps, *extra, config="configs/demo/pretrain.py"):
  env, cache = gcs
  overrides = {"run.workdir": workdir, "data.cache_dir": cache, "train.steps": steps,
               "train.log_every_steps": 1, "train.eval_every_steps": 0,
               "train.checkpoint_every_steps": 4, "model.d_model": 64, "model.n_layers": 2,
               "model.d_ff": 128, "data.seq_len": 64, "optim.schedule": "constant",
               "optim.warmup_steps": 0}
  return subprocess.run([sys.executable, "-m", "jmid.train", f"--config={config}",
                         *[f"--config.{k}={v}" for k, v in overrides.items()], *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(workdir):
  from jmid import fs
  return {r["step"]: r["loss"] for r in map(json.loads, fs.read_text(
      f"{workdir}/metrics.jsonl").splitlines())}


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_exactly_and_hands_over(gcs, tmp_path):
  from jmid import fs, resume
  straight, split = f"gs://{BUCKET}/straight", f"gs://{BUCKET}/split"
  out = _train(gcs, straight, 8)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert fs.listdir(straight) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
  assert resume.checkpoint_steps(f"{straight}/checkpoints") == [4, 8]  # the lock was released
  assert fs.listdir(f"{straight}/tensorboard")  # the event file, copied up at each log step
  for steps in (4, 8):
    out = _train(gcs, split, steps)
    assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from gs://" in out.stdout
  assert _losses(split) == _losses(straight)  # bit for bit, data order included

  # A step Orbax did not finish (no commit marker: a crash mid-save in a bucket) is not one
  fs.write_text(f"{split}/checkpoints/12/state/_METADATA", "{}")
  assert resume.checkpoint_steps(f"{split}/checkpoints") == [4, 8]

  # The next stage starts from the bucket; info and verify read it there
  env, _ = gcs
  info = subprocess.run([sys.executable, "-m", "jmid.checkpoint", "verify", straight], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert info.returncode == 0 and info.stdout.count(": ok, 39 arrays verified") == 2, info.stdout
  local = str(tmp_path / "next")
  out = _train(gcs, local, 2, f"--config.init.from_path={straight}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"params from {straight}/checkpoints/8" in out.stdout


@pytest.mark.slow
def test_a_busy_bucket_workdir_is_refused_and_s3_is_one_line(gcs):
  from jmid import fs
  busy = f"gs://{BUCKET}/busy"
  holder = {"host": os.uname().nodename, "pid": os.getpid(), "pid_start": "", "started": 0,
            "token": "other"}  # this test process: alive
  fs.write_text(f"{busy}/jmid.lock", json.dumps(holder))
  out = _train(gcs, busy, 2)
  assert out.returncode == 2 and "is in use by another run" in out.stderr, out.stderr[-2000:]
  assert fs.listdir(busy) == ["jmid.lock"]  # nothing written
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  fs.write_text(f"{busy}/jmid.lock", json.dumps({**holder, "pid": int(gone)}))  # SIGKILLed
  out = _train(gcs, busy, 2)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"took over the stale lock of pid {gone}" in out.stdout
  out = _train(gcs, "s3://bucket/run", 2)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1 and "s3:// is not supported" in lines[0], lines


@pytest.mark.slow
def test_data_sources_in_a_bucket_train_like_their_local_files(gcs, tmp_path):
  """Token files uploaded to the bucket are copied once into data.cache_dir/remote and read
  there: the run equals the same run on the local files; an s3:// source is one line."""
  import fsspec
  from jmid.data import demo
  _, cache = gcs
  built = demo.build_demo_corpus(cache)
  bucket = fsspec.filesystem("gs")
  for name in ("text", "code"):
    bucket.put(built[name], f"{BUCKET}/data/{name}", recursive=True)
  config = tmp_path / "two_sources.py"
  config.write_text(
      "from ml_collections import ConfigDict\n"
      "from configs.demo import pretrain\n\n\n"
      "def get_config(arg=None):\n"
      "  c = pretrain.get_config(arg)\n"
      "  c.data.demo = False\n"
      "  c.data.sources.text = ConfigDict(dict(path='', weight=0.5))\n"
      "  c.data.sources.code = ConfigDict(dict(path='', weight=0.5))\n"
      "  return c\n")

  def sources(text, code):
    return [f"--config.data.sources.text.path={text}", f"--config.data.sources.code.path={code}"]
  local = _train(gcs, str(tmp_path / "local"), 4, *sources(built["text"], built["code"]),
                 config=str(config))
  assert local.returncode == 0, local.stderr[-3000:]
  remote = _train(gcs, str(tmp_path / "remote"), 4, *sources(f"gs://{BUCKET}/data/text",
                                                             f"gs://{BUCKET}/data/code"),
                  config=str(config))
  assert remote.returncode == 0, remote.stderr[-3000:]
  read = lambda w: [json.loads(l)["loss"] for l in open(os.path.join(w, "metrics.jsonl"))]  # noqa
  assert read(tmp_path / "remote") == read(tmp_path / "local")
  assert sorted(os.listdir(os.path.join(cache, "remote", BUCKET, "data", "text"))) == [
      "meta.json", "meta.json.source.json", "offsets.npy", "offsets.npy.source.json",
      "tokens.bin", "tokens.bin.source.json"]
  out = _train(gcs, str(tmp_path / "s3"), 4, *sources("s3://b/text", built["code"]),
               config=str(config))
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1 and "data.sources.text.path=s3://" in lines[0]
