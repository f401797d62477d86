"""benchmarks/train.py end to end on a tiny model: jmid and the transformers peer both train,
and the JSON says so consistently."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.n_layers=1", "--config.model.d_model=64", "--config.data.seq_len=64",
        "--config.train.global_batch=2", "--config.mesh.fsdp=1"]


def test_train_benchmark_with_peer(tmp_path):
  out = tmp_path / "x.json"
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if "xla_force_host_platform_device_count" not in f)
  # one device; one torch thread: on a busy 2-core machine two spin-waiting OpenMP threads
  # make each tiny peer step ~100x slower
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, OMP_NUM_THREADS="1")
  cmd = [sys.executable, "benchmarks/train.py", "--config=configs/demo/pretrain.py", *TINY,
         "--steps=2", "--peer", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  jmid, peer = r["jmid"], r["peer"]
  assert jmid["tokens_per_sec"] > 0 and peer["tokens_per_sec"] > 0
  assert r["ratio"] == jmid["tokens_per_sec"] / peer["tokens_per_sec"]  # one device
  assert r["tokens_per_step"] == 2 * 64 and peer["attention"] == "sdpa, causal"
  chance = math.log(384)  # the demo config's vocab_size; both models start random
  for system in (jmid, peer):
    assert math.isfinite(system["loss_first"]) and math.isfinite(system["loss_last"])
    assert abs(system["loss_first"] - chance) < 0.2 * chance, system
  assert "jmid" in proc.stdout and "peer" in proc.stdout and "ratio" in proc.stdout
