"""Fault injection: kill -9 a demo run at random points, resume each time, compare to a run
that was never interrupted. Each kill waits for a random target step (sorted, so the kills
spread over the whole run) and then a random fraction of a second more, so kills land inside
steps, during async saves, and (when the resumed run's log already passed the target) during
start-up and restore. Outside the default suite (a few minutes):

  python tests/fault_injection.py [--kills=10] [--seed=0] [--out=DIR]

After every kill it reads back every checkpoint the manager lists (state, data iterator, meta):
none may be unreadable. At the end the final params must equal the uninterrupted run's
bit for bit, and the logged losses too. Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

STEPS = 120


def command(workdir: str, cache: str) -> list[str]:
  overrides = {"run.workdir": workdir, "data.cache_dir": cache, "train.steps": STEPS,
               "train.log_every_steps": 1, "train.eval_every_steps": 0,
               "train.checkpoint_every_steps": 5, "data.seq_len": 128,
               "optim.warmup_steps": 10, "optim.decay_steps": 20}
  return [sys.executable, "-m", "jmid.train", "--config=configs/demo/pretrain.py",
          *[f"--config.{k}={v}" for k, v in overrides.items()]]


def env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu")


def finished_steps(workdir: str) -> list[int]:
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def read_all(step_dir: str) -> dict:
  """Everything a resume reads; raises if any of it is unreadable."""
  state = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    json.load(f)
  data_dir = os.path.join(step_dir, "data")
  for name in os.listdir(data_dir):
    if name.endswith(".json"):
      with open(os.path.join(data_dir, name)) as f:
        json.load(f)
  return state


def logged_step(workdir: str) -> int:
  """The last step in metrics.jsonl (0 when there is none yet)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0
  except (OSError, ValueError, KeyError):
    return 0


def losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  tmp = args.out or tempfile.mkdtemp(prefix="jmid-faults-")
  cache, straight, killed = (os.path.join(tmp, d) for d in ("cache", "straight", "killed"))
  t0 = time.time()
  subprocess.run(command(straight, cache), cwd=ROOT, env=env(), check=True,
                 capture_output=True)
  run_s = time.time() - t0
  print(f"uninterrupted run: {run_s:.0f} s; now {args.kills} kills at random moments",
        flush=True)
  kills, checked = [], 0
  targets = sorted(rng.sample(range(1, STEPS), args.kills))
  for i in range(args.kills):
    proc = subprocess.Popen(command(killed, cache), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and logged_step(killed) < targets[i]:
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.6))
    delay = time.time() - t0
    finished = proc.poll() is not None
    if finished and proc.returncode != 0:
      print(f"the run failed on its own (exit {proc.returncode}) before kill {i + 1}")
      return 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = finished_steps(killed)
    for s in steps:
      read_all(os.path.join(killed, "checkpoints", str(s)))
      checked += 1
    last = max(losses(killed)) if os.path.exists(os.path.join(killed, "metrics.jsonl")) else 0
    kills.append({"target_step": targets[i], "after_s": round(delay, 2), "last_logged_step": last,
                  "checkpoints": steps, "had_finished": finished})
    print(f"kill {i + 1:2d} (target step {targets[i]:3d}) after {delay:5.1f} s: logged up to "
          f"step {last}, checkpoints {steps}" + (" (it had already finished)" if finished else ""),
          flush=True)
  done = subprocess.run(command(killed, cache), cwd=ROOT, env=env(), capture_output=True,
                        text=True)
  if done.returncode != 0:
    print(done.stderr[-2000:])
    return 1
  a = read_all(os.path.join(straight, "checkpoints", str(STEPS)))["params"]
  b = read_all(os.path.join(killed, "checkpoints", str(STEPS)))["params"]
  import jax
  same_params = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  same_losses = losses(straight) == losses(killed)
  result = {"kills": kills, "checkpoints_read_back": checked, "final_params_equal": same_params,
            "losses_equal": same_losses, "steps": STEPS}
  with open(os.path.join(tmp, "fault_injection.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"{checked} checkpoint reads after kills, all readable | final params equal: "
        f"{same_params} | losses equal: {same_losses} | {tmp}/fault_injection.json")
  return 0 if same_params and same_losses else 1


if __name__ == "__main__":
  sys.exit(main())
