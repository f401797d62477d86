"""Checkpoint integrity: the fingerprints saved with every checkpoint catch bytes that changed
on disk; a resume falls back to the newest intact step and leaves the damaged one untouched;
verify, info, export, average and init.from_path of a damaged checkpoint end in one line.
"""

import gc
import hashlib
import json
import os
import shutil
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jmid import checkpoint as ckpt_lib
from jmid.checkpoint import commands as ckpt_commands
from jmid import config as config_lib
from jmid import build, export, handoff, integrity, sharding, train
from jmid.checkpoint import DamagedCheckpoint
from jmid.data import pipeline
from tests.helpers import run_configdict

STEPS = 6  # checkpoints at 3 and 6
# the tests read checkpoints raw (no target) to compare with what jmid restored
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")


def _cfg(workdir, cache_dir, steps=STEPS):
  return run_configdict(workdir, cache_dir, steps, evals=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory, cache_dir):
  w = tmp_path_factory.mktemp("source") / "run"
  train.train(_cfg(w, cache_dir))
  return w


@pytest.fixture(scope="module")
def kit(source, cache_dir):
  """The source run's config, mesh and setup (built once), a fresh data iterator, and
  resume(workdir) -> restore_latest_intact(...) + the data iterator it set."""
  c = config_lib.from_configdict(_cfg(source, cache_dir))
  mesh = sharding.make_mesh(c.mesh)
  su = build.setup(c, mesh)
  srcs = pipeline.open_sources(c.data)

  def new_iter():
    return pipeline.train_iterator(c.data, srcs, batch_size=c.train.global_batch,
                                   seed=c.run.seed)

  def resume(workdir):
    it = new_iter()
    manager = ckpt_lib.make_manager(str(workdir), 3)
    try:
      with jax.set_mesh(mesh):
        return (*ckpt_lib.restore_latest_intact(manager, su.abstract_state, it), it)
    finally:
      manager.close()
  return types.SimpleNamespace(c=c, mesh=mesh, su=su, new_iter=new_iter, resume=resume)


def _digest(root):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(os.path.join(d, f).encode())
      with open(os.path.join(d, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def _live_values(state_dir, victim):
  """(offset, length) of every byte range of `victim` that the checkpoint's OCDBT index
  references (array chunks and b-tree nodes); anything else in the file is never read."""
  kv = ts.KvStore.open({"driver": "file", "path": str(state_dir) + "/"}).result()
  version = ts.ocdbt.dump(kv).result()["versions"][-1]
  assert version["root_height"] == 0, "a deeper b-tree: walk its interior nodes too"
  root = version["root"]["location"]
  refs = [root] + [e["indirect_value"] for e in ts.ocdbt.dump(kv, root).result()["entries"]
                   if "indirect_value" in e]
  out = []
  for ref in refs:  # "value:<prefix>:d/<file>:<offset>:<length>", "btreenode::d/<file>:..."
    _, prefix, name, offset, length = ref.split(":")
    if os.path.join(state_dir, prefix, name) == str(victim):
      out.append((int(offset), int(length)))
  return sorted(out)


def _zero(path, offset, n=4096):
  with open(path, "r+b") as f:
    f.seek(offset)
    old = f.read(n)
    f.seek(offset)
    f.write(b"\0" * len(old))
  with open(path, "rb") as f:
    f.seek(offset)
    assert old != f.read(n), "the damage changed nothing: pick another offset"


def _change_one_ulp(step_dir, key="params.embed"):
  """A value that TensorStore reads back without any error, one ulp off what was saved (as
  bytes zeroed inside a large chunk can read back: see the test below)."""
  t = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{step_dir}/state/",
                                              "path": key + "/"}}).result()
  x = t[1, 2].read().result()
  t[1, 2].write(np.nextafter(x, np.float32(np.inf))).result()


def _one_line(err):
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("jmid: error: "), err
  return lines[0]


def test_fingerprints_are_the_same_on_any_mesh_and_see_one_ulp():
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(64, 48)).astype(np.float32),
          "b": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
          "h": rng.normal(size=(8, 4)).astype(np.float16),
          "u": rng.integers(0, 2**32, size=(8, 16), dtype=np.uint32),
          "i8": rng.integers(-128, 128, size=(16,), dtype=np.int8),
          "mask": rng.normal(size=(8, 2)) > 0,
          "opt": (np.int32(7), {"count": np.int32(3)})}
  auto = (AxisType.Auto,) * 2
  a = jax.make_mesh((4, 2), ("x", "y"), axis_types=auto)
  b = jax.make_mesh((1, 2), ("x", "y"), devices=jax.devices()[5:7], axis_types=auto)
  on_a = jax.tree.map(lambda v: jax.device_put(v, NamedSharding(a, P("x", "y") if np.ndim(v) == 2
                                                                  else P())), tree)
  on_b = jax.tree.map(lambda v: jax.device_put(v, NamedSharding(b, P(None, "y") if np.ndim(v) == 2
                                                                  else P())), tree)
  fa, fb, host = (integrity.fingerprints(t) for t in (on_a, on_b, tree))
  assert fa == fb == host
  assert set(fa) == {"w", "b", "h", "u", "i8", "mask", "opt.0", "opt.1.count"}
  w = tree["w"].copy()
  w[17, 3] = np.nextafter(w[17, 3], np.float32(np.inf))
  assert integrity.compare(fa, integrity.fingerprints({**tree, "w": w})) == ["w"]
  b16 = np.asarray(tree["b"]).copy()
  b16[[2, 5]] = b16[[5, 2]]  # rows swapped: the plain sum stays, the weighted one does not
  assert integrity.compare(fa, integrity.fingerprints({**tree, "b": b16})) == ["b"]
  assert integrity.compare(fa, {"w": fa["w"], "new": [0, 0]}) == []  # only keys in both


@pytest.mark.parametrize("where", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
def test_zeroed_4k_in_the_largest_file_is_caught_and_resume_falls_back(
    tmp_path, source, kit, capsys, where):
  w = tmp_path / "w"
  shutil.copytree(source, w)
  step_dir = w / "checkpoints" / str(STEPS)
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  live = _live_values(step_dir / "state", victim)
  assert live, victim
  offset = live[round(where * (len(live) - 1))][0]  # zeroes reach into the bytes it reads
  _zero(victim, min(offset, victim.stat().st_size - 4096))
  before = _digest(step_dir)

  assert ckpt_commands.main(["verify", str(step_dir)]) == 2
  out, err = capsys.readouterr()
  assert f"{step_dir}: DAMAGED: arrays " in out
  assert str(step_dir) in _one_line(err)

  state, meta, step, notes, it = kit.resume(w)
  assert step == 3 and meta.step == 3
  fresh = kit.new_iter()
  for _ in range(3):
    next(fresh)
  np.testing.assert_array_equal(next(it)["inputs"], next(fresh)["inputs"])  # at step 3's place
  assert len(notes) == 1 and notes[0].startswith(f"checkpoint {step_dir} is damaged (")
  assert notes[0].endswith("resumed from step 3 instead")
  saved = ocp.PyTreeCheckpointer().restore(str(w / "checkpoints" / "3" / "state"))
  np.testing.assert_array_equal(np.asarray(state["params"]["embed"]), saved["params"]["embed"])
  assert _digest(step_dir) == before  # the damaged folder is left exactly as it was


def test_a_value_orbax_reads_back_silently_wrong_is_caught(tmp_path, source, kit, capsys):
  w = tmp_path / "w"
  shutil.copytree(source, w)
  step_dir = w / "checkpoints" / str(STEPS)
  _change_one_ulp(step_dir)
  raw = ocp.PyTreeCheckpointer().restore(str(step_dir / "state"))  # no error from Orbax...
  good = ocp.PyTreeCheckpointer().restore(str(source / "checkpoints" / str(STEPS) / "state"))
  assert not np.array_equal(raw["params"]["embed"], good["params"]["embed"])  # ...yet wrong

  assert ckpt_commands.main(["verify", str(w)]) == 2
  out, err = capsys.readouterr()
  assert f"{w / 'checkpoints' / '3'}: ok, " in out
  assert f"{step_dir}: DAMAGED: arrays params.embed (changed)" in out
  _one_line(err)
  assert ckpt_commands.main(["info", str(w)]) == 2
  assert "params.embed" in _one_line(capsys.readouterr().err)

  _, _, step, notes, _ = kit.resume(w)
  assert step == 3 and "params.embed" in notes[0]


def test_zeroes_that_orbax_restores_without_an_error_are_caught(tmp_path):
  """A real-size array (one 4 MB chunk): 4 KB zeroed near the start of its compressed bytes
  decodes into wrong values with no error from Orbax; zeroed anywhere, jmid catches it."""
  w = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32) * 0.02
  ckpt_lib.save_params(str(tmp_path / "ckpt"), {"w": w}, ckpt_lib.Meta(step=0))
  silent = 0
  for i, where in enumerate((0.02, 0.1, 0.5, 0.9)):
    d = tmp_path / f"copy{i}"
    shutil.copytree(tmp_path / "ckpt", d)
    victim = max((p for p in (d / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    (offset, length), = _live_values(d / "state", victim)
    _zero(victim, offset + int(where * (length - 4096)))
    try:
      raw = ocp.PyTreeCheckpointer().restore(str(d / "state"))["params"]["w"]
      silent += int(not np.array_equal(raw, w))
    except Exception:  # noqa: BLE001  (this spot breaks zstd's framing: Orbax sees it)
      pass
    with pytest.raises(DamagedCheckpoint, match=r"params\.w"):
      ckpt_lib.read_array(str(d), "params.w")
  assert silent, "every spot raised in Orbax: no silent case left to test"


def test_export_average_and_init_from_a_damaged_checkpoint_are_one_line(tmp_path, source, kit,
                                                                        capsys):
  w = tmp_path / "w"
  shutil.copytree(source, w)
  _change_one_ulp(w / "checkpoints" / str(STEPS))
  assert export.main([f"--workdir={w}", f"--out={tmp_path / 'hf'}"]) == 2
  assert "is damaged: params.embed differ" in _one_line(capsys.readouterr().err)
  assert not os.path.exists(tmp_path / "hf")
  assert ckpt_commands.main(["average", f"--out={tmp_path / 'soup'}", str(w / "checkpoints" / "3"),
                        str(w / "checkpoints" / str(STEPS))]) == 2
  _one_line(capsys.readouterr().err)
  source = handoff.find(str(w))  # init.from_path: what train.py does before its first step
  with pytest.raises(DamagedCheckpoint, match="params.embed") as e, jax.set_mesh(kit.mesh):
    handoff.load_state(source, "params", kit.mesh, kit.su.abstract_state, kit.su.param_names,
                       kit.su.tx, kit.su.state_from_params, kit.c.model)
  assert "\n" not in str(e.value) and "bound method" not in str(e.value)


def test_verify_an_intact_run_and_one_saved_without_fingerprints(tmp_path, source, kit,
                                                                  capsys):
  n = len(ckpt_lib.saved_shapes(str(source / "checkpoints" / str(STEPS))))
  assert ckpt_commands.main(["verify", str(source)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 2 and all(f": ok, {n} arrays verified" in line for line in out), out
  w = tmp_path / "w"
  shutil.copytree(source, w)
  meta_file = w / "checkpoints" / str(STEPS) / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["fingerprints"]  # as an older jmid wrote it
  meta_file.write_text(json.dumps(meta))
  assert ckpt_commands.main(["verify", str(w / "checkpoints" / str(STEPS))]) == 0
  assert f"no fingerprints (written before jmid recorded them), {n} arrays readable" in \
      capsys.readouterr().out
  _, _, step, notes, _ = kit.resume(w)
  assert step == STEPS and notes == []


def test_every_checkpoint_damaged_is_one_error_and_changes_nothing(tmp_path, source, kit):
  w = tmp_path / "w"
  shutil.copytree(source, w)
  for step in (3, STEPS):
    _change_one_ulp(w / "checkpoints" / str(step))
  before = _digest(w)
  with pytest.raises(DamagedCheckpoint, match=r"every checkpoint in .* is damaged \(6: "
                                              r"params.embed .*3: .*nothing was changed"):
    kit.resume(w)
  assert _digest(w) == before


class _RaisesWhenDropped:
  def __init__(self, text):
    self.text = text

  def __del__(self):
    raise RuntimeError(self.text)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_reads_orbax_abandons_after_a_failure_print_nothing(capsys):
  """Orbax closes its event loop at the first failed chunk read; the reads it abandoned then
  report through sys.unraisablehook (a traceback each, after the one-line error)."""
  ckpt_lib._quiet_abandoned_reads()
  for text in ("Event loop is closed",
               "Encountered error while reading array index: (slice(0, 2, 1),). See full"):
    _RaisesWhenDropped(text)  # dropped at once: its __del__ raises what those reads raise
  assert capsys.readouterr().err == ""


@pytest.mark.slow  # about 45 s: the fast lane keeps under 20 minutes
def test_reads_a_failed_restore_abandons_say_nothing_when_collected_later(tmp_path, source, kit,
                                                                          capsys, caplog):
  """Orbax runs a restore on an event loop it closes at the first failed chunk, leaving the
  other reads' tasks pending or failed; whenever the garbage collector later frees them, asyncio
  logs a traceback each ("Task exception was never retrieved"), long after the one-line error.
  Formatting those tracebacks parses source: inside the demo corpus build's own ast.parse that
  crashed CPython 3.11 ("AST constructor recursion depth mismatch", a red CI lane twice)."""
  w = tmp_path / "w"
  shutil.copytree(source, w)
  for f in (w / "checkpoints").rglob("*"):
    if f.is_file() and f.parent.name == "d" and f.parent.parent.name != "state":
      os.truncate(f, f.stat().st_size // 3)
  caplog.set_level("WARNING", logger="asyncio")
  with pytest.raises(DamagedCheckpoint, match="every checkpoint"):
    kit.resume(w)
  for _ in range(20):  # the abandoned reads end in TensorStore's threads, then become garbage
    gc.collect()
    time.sleep(0.05)
  assert [r.getMessage()[:200] for r in caplog.records if r.name == "asyncio"] == []
  assert capsys.readouterr().err == ""
