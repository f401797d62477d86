"""A checkpoint written before the model was made of modules (weights flat under `blocks`,
fingerprints under those names, a version 1 meta; made here by rewriting a real checkpoint on
disk the way the old code wrote it) resumes to the losses of an uninterrupted run, hands its params off, exports
the same tensors and verifies: jmid/checkpoint/legacy.py."""

import json
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jmid import export, integrity, train
from jmid.checkpoint import commands as ckpt_commands
from jmid.checkpoint import legacy
from tests.helpers import run_configdict


def _cfg(workdir, cache_dir, steps):
  c = run_configdict(workdir, cache_dir, steps, evals=False)
  c.model.qk_norm = True  # a module inside attention (attn.q_norm.scale) moves too
  return c


def _losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))}


def _make_old(step_dir):
  """Rewrites a step's state/ and meta fingerprints under the old flat names."""
  state = ocp.PyTreeCheckpointer().restore(str(step_dir / "state"))
  old = legacy.to_old(state)
  assert "wq" in old["params"]["blocks"] and "attn" not in old["params"]["blocks"]
  shutil.rmtree(step_dir / "state")
  ocp.PyTreeCheckpointer().save(str(step_dir / "state"), old)
  meta_path = step_dir / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  meta["fingerprints"] = integrity.fingerprints(old)
  assert "params.blocks.wq" in meta["fingerprints"]
  del meta["version"]  # version 1: no version key, the model spec inside config as well
  meta["config"]["model"] = meta["model"]
  meta_path.write_text(json.dumps(meta))


def _tensors(folder):
  from safetensors.numpy import load_file
  out = {}
  for f in sorted(folder.glob("*.safetensors")):
    out.update(load_file(str(f)))
  return out


@pytest.mark.slow
def test_an_old_checkpoint_resumes_hands_off_exports_and_verifies(tmp_path, cache_dir):
  train.train(_cfg(tmp_path / "straight", cache_dir, 6))
  train.train(_cfg(tmp_path / "old", cache_dir, 6), stop_after=3)
  shutil.copytree(tmp_path / "old", tmp_path / "new")  # the same step 3, today's names
  _make_old(tmp_path / "old" / "checkpoints" / "3")
  old_step = tmp_path / "old" / "checkpoints" / "3"
  assert ckpt_commands.main(["verify", str(old_step)]) == 0
  for name in ("old", "new"):
    assert export.main([f"--workdir={old_step if name == 'old' else tmp_path / 'new'}",
                        f"--out={tmp_path / (name + '_hf')}"]) == 0
  a, b = _tensors(tmp_path / "old_hf"), _tensors(tmp_path / "new_hf")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  handoff = _cfg(tmp_path / "handoff", cache_dir, 0)
  handoff.init.from_path = str(old_step)
  train.train(handoff)
  got = ocp.PyTreeCheckpointer().restore(str(tmp_path / "handoff" / "checkpoints" / "0" /
                                             "state"))["params"]["blocks"]["attn"]["wq"]
  np.testing.assert_array_equal(got, np.asarray(ocp.PyTreeCheckpointer().restore(
      str(tmp_path / "new" / "checkpoints" / "3" / "state"))["params"]["blocks"]["attn"]["wq"]))
  train.train(_cfg(tmp_path / "old", cache_dir, 6))  # resumes from the old step 3
  straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "old")
  assert sorted(resumed) == list(range(1, 7))
  for step in range(4, 7):
    assert resumed[step] == straight[step], step
