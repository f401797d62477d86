"""Stage handoff: params / params+optimizer / ema starts, lr_from_checkpoint, vocab growth,
restore onto another mesh, averaging, lineage, and clear errors for checkpoints that do not fit.
"""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jmid import checkpoint as ckpt_lib
from jmid.checkpoint import commands as ckpt_commands
from jmid import config as config_lib
from jmid import model as model_lib
from jmid import build, sharding, train
from jmid.config import MeshConfig
from jmid.errors import UserError
from jmid.data import pipeline
from tests.helpers import run_configdict

SOURCE_STEPS = 6
SOURCE_END_LR = 1e-3  # linear 3e-3 -> 1e-3 over the source run: its stored lr is not 0


def _cfg(workdir, cache_dir, steps=4):
  c = run_configdict(workdir, cache_dir, steps, evals=False)
  c.optim.schedule, c.optim.lr, c.optim.end_lr = "linear", 3e-3, SOURCE_END_LR
  return c


@pytest.fixture(scope="module")
def source(tmp_path_factory, cache_dir):
  """A finished first stage with checkpoints at steps 3 and 6 and an EMA of its params."""
  w = tmp_path_factory.mktemp("source") / "run"
  c = _cfg(w, cache_dir, steps=SOURCE_STEPS)
  c.run.name = "stage-one"
  c.train.ema_decay = 0.5
  train.train(c)
  return w


def _raw(step_dir):
  return ocp.PyTreeCheckpointer().restore(os.path.join(str(step_dir), "state"))


def _flat(tree):
  return {ckpt_lib.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _logits(params, cfg):
  graphdef, _, _ = model_lib.abstract_model(config_lib.from_configdict(cfg).model)
  tokens = np.arange(2 * 16, dtype=np.int32).reshape(2, 16) % 300
  positions = np.tile(np.arange(16, dtype=np.int32), (2, 1))
  return np.asarray(model_lib.apply(graphdef, jax.tree.map(np.asarray, params), tokens,
                                    positions, np.ones_like(tokens)))


def _start(tmp_path, cache_dir, source, name="dst", steps=0, **init):
  c = _cfg(tmp_path / name, cache_dir, steps=steps)
  c.init.from_path = str(source)
  for k, v in init.items():
    setattr(c.init, k, v)
  return c


def test_params_start_gives_the_source_model_logits(tmp_path, cache_dir, source):
  c = _start(tmp_path, cache_dir, source)
  train.train(c)
  src = _raw(source / "checkpoints" / str(SOURCE_STEPS))
  dst = _raw(tmp_path / "dst" / "checkpoints" / "0")
  np.testing.assert_array_equal(_logits(dst["params"], c), _logits(src["params"], c))
  assert int(dst["step"]) == 0
  assert not any(np.any(v) for v in _flat(dst["opt_state"]).values())  # fresh optimizer


def test_params_plus_optimizer_carries_moments_but_restarts_the_schedule(tmp_path, cache_dir,
                                                                          source):
  c = _start(tmp_path, cache_dir, source, steps=1, load="params+optimizer")
  c.train.checkpoint_every_steps = 100
  train.train(c, stop_after=0)
  src = _flat(_raw(source / "checkpoints" / str(SOURCE_STEPS))["opt_state"])
  dst = _flat(_raw(tmp_path / "dst" / "checkpoints" / "0")["opt_state"])
  assert src.keys() == dst.keys()
  moments = [k for k in src if ".mu." in k or ".nu." in k]
  assert moments and all(np.array_equal(src[k], dst[k]) for k in moments)
  counts = {k: (int(src[k]), int(dst[k])) for k in src if k.endswith("count")}
  # AdamW's count (bias correction of the carried moments) goes on; the lr schedule restarts
  assert sorted(counts.values()) == [(SOURCE_STEPS, 0), (SOURCE_STEPS, SOURCE_STEPS)], counts
  train.train(c)  # and it trains from there
  assert _records(tmp_path / "dst")[0]["lr"] == pytest.approx(3e-3)


def test_ema_start_takes_the_source_ema(tmp_path, cache_dir, source):
  train.train(_start(tmp_path, cache_dir, source, load="ema"))
  src = _raw(source / "checkpoints" / str(SOURCE_STEPS))
  dst = _raw(tmp_path / "dst" / "checkpoints" / "0")
  ema, params = _flat(src["ema"]), _flat(dst["params"])
  assert ema.keys() == params.keys()
  assert all(np.array_equal(ema[k], params[k]) for k in ema)
  assert any(not np.array_equal(ema[k], _flat(src["params"])[k]) for k in ema)


def test_lr_from_checkpoint_starts_at_the_stored_lr_and_survives_resume(tmp_path, cache_dir,
                                                                        source):
  c = _start(tmp_path, cache_dir, source, steps=4)
  c.optim.lr_from_checkpoint, c.optim.end_lr = True, 0.0
  train.train(c, stop_after=2)
  train.train(c)  # resume: the lr must come from this run's checkpoint, not be re-resolved
  records = {r["step"]: r for r in _records(tmp_path / "dst")}
  assert records[1]["init/lr"] == pytest.approx(SOURCE_END_LR)
  assert records[1]["lr"] == pytest.approx(SOURCE_END_LR)  # the lr of the first update
  assert records[3]["lr"] == pytest.approx(SOURCE_END_LR * 0.5)  # linear anneal to 0
  assert records[3]["init"].startswith("resumed from")
  cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
  assert cfg["optim"]["lr"] == pytest.approx(SOURCE_END_LR)
  meta = ckpt_lib.read_meta(str(tmp_path / "dst" / "checkpoints" / "4"))
  origin = meta.lineage[0]
  assert origin.path == str(source / "checkpoints" / str(SOURCE_STEPS))
  assert origin.run == "stage-one" and origin.load == "params" and origin.architecture is None


def test_larger_vocab_gets_mean_rows(tmp_path, cache_dir, source):
  c = _start(tmp_path, cache_dir, source)
  c.model.vocab_size = 400
  train.train(c)
  src = _raw(source / "checkpoints" / str(SOURCE_STEPS))["params"]
  dst = _raw(tmp_path / "dst" / "checkpoints" / "0")["params"]
  for name, axis in (("embed", 0), ("lm_head", 1)):
    old, new = np.asarray(src[name]), np.asarray(dst[name])
    assert new.shape[axis] == 400
    np.testing.assert_array_equal(np.take(new, range(384), axis), old)
    mean = old.mean(axis=axis, keepdims=True)
    np.testing.assert_allclose(np.take(new, range(384, 400), axis),
                               np.repeat(mean, 16, axis=axis), rtol=1e-5, atol=1e-9)


def test_another_architecture_names_the_mismatching_shapes(tmp_path, cache_dir, source):
  c = _start(tmp_path, cache_dir, source)
  c.model.d_ff = 128
  with pytest.raises(UserError, match=r"another architecture.*w_up \(2, 32, 64\) vs "
                                      r"\(2, 32, 128\)"):
    train.train(c)
  assert not os.path.exists(tmp_path / "dst" / "config.json")


def test_restore_onto_another_mesh_carries_the_new_shardings(tmp_path, cache_dir, source):
  """Saved on data 4 x fsdp 2 (8 devices); restored onto fsdp 2 x tensor 2 (4 devices)."""
  cd = _cfg(tmp_path / "x", cache_dir)
  cd.train.ema_decay = 0.5
  c = config_lib.from_configdict(cd)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, context=1), jax.devices()[:4])
  su = build.setup(c, mesh)
  srcs = pipeline.open_sources(c.data)
  it = pipeline.train_iterator(c.data, srcs, batch_size=8, seed=0)
  manager = ckpt_lib.make_manager(str(source), 3)
  with jax.set_mesh(mesh):
    state, _ = ckpt_lib.restore(manager, SOURCE_STEPS, su.abstract_state, it)
  manager.close()
  saved = _flat(_raw(source / "checkpoints" / str(SOURCE_STEPS))["params"])
  got = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  want_sh = jax.tree.leaves(su.param_sh)
  assert any(len(set(s.spec) - {None}) for s in want_sh)  # something really is sharded
  for (p, x), sh in zip(got, want_sh):
    assert x.sharding == sh and len(x.sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(x), saved[ckpt_lib.path_str(p)])


def test_average_is_the_elementwise_mean_and_starts_a_run(tmp_path, cache_dir, source):
  out = tmp_path / "soup"
  a, b = source / "checkpoints" / "3", source / "checkpoints" / str(SOURCE_STEPS)
  assert ckpt_commands.main(["average", f"--out={out}", str(a), str(b)]) == 0
  avg, pa, pb = (_flat(_raw(d)["params"]) for d in (out, a, b))
  assert avg.keys() == pa.keys()
  for k in avg:
    np.testing.assert_allclose(avg[k], (pa[k] + pb[k]) / 2, rtol=1e-6, atol=1e-7)
  c = _start(tmp_path, cache_dir, out)
  train.train(c)
  dst = _flat(_raw(tmp_path / "dst" / "checkpoints" / "0")["params"])
  assert all(np.array_equal(dst[k], avg[k]) for k in avg)
  assert ckpt_commands.main(["average", f"--out={out}", str(a), str(b)]) == 2  # never overwrites


def test_info_prints_spec_and_lineage_back_to_the_first_stage(tmp_path, cache_dir, source,
                                                              capsys):
  train.train(_start(tmp_path, cache_dir, source, name="mid", steps=1))
  train.train(_start(tmp_path, cache_dir, tmp_path / "mid", name="post", steps=1))
  assert ckpt_commands.main(["info", str(tmp_path / "post")]) == 0
  text = capsys.readouterr().out
  assert "d_model=32" in text and "n_layers=2" in text
  assert f"of {tmp_path / 'mid' / 'checkpoints' / '1'}" in text
  assert f"of {source / 'checkpoints' / str(SOURCE_STEPS)} (run stage-one" in text
  assert ckpt_commands.main(["info", str(tmp_path)]) == 2


def _tree_digest(root):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      p = os.path.join(d, f)
      h.update(p.encode())
      with open(p, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_checkpoint_is_one_error_and_leaves_the_workdir_alone(tmp_path, cache_dir,
                                                                      source, damage):
  w = tmp_path / "w"
  shutil.copytree(source, w)
  # every step damaged (with one intact step the resume falls back to it: test_integrity)
  files = sorted(p for p in (w / "checkpoints").rglob("*") if p.is_file()
                 and p.stat().st_size > 64 and "state" in p.parts)
  # Orbax spreads the arrays over several data files in an order that varies from run to run,
  # and the largest one alone may hold nothing the resume reads: damage every data file
  data = [p for p in files if p.parent.name == "d" and p.parent.parent.name != "state"]
  assert data, files
  for victim in data:
    if damage == "truncate":
      victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    else:
      victim.unlink()
  before = _tree_digest(w)
  c = _cfg(w, cache_dir, steps=SOURCE_STEPS + 2)
  c.train.ema_decay = 0.5
  with pytest.raises(UserError, match="is damaged"):
    train.train(c)
  assert _tree_digest(w) == before
  for f in files:  # init.from_path reads params only: damage every array file for it to see
    if f.exists():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  with pytest.raises(UserError, match="damaged"):
    train.train(_start(tmp_path, cache_dir, w))


def test_unfinished_save_is_ignored_and_the_run_resumes(tmp_path, cache_dir, source):
  """What Orbax leaves when killed mid-save: a step under a tmp name, never a plain number."""
  w = tmp_path / "w"
  shutil.copytree(source, w)
  partial = w / "checkpoints" / f"9{ocp.utils.TMP_DIR_SUFFIX}-1700000000"
  shutil.copytree(w / "checkpoints" / "6", partial)
  (partial / "state" / "manifest.ocdbt").unlink()
  c = _cfg(w, cache_dir, steps=SOURCE_STEPS + 2)
  c.train.ema_decay = 0.5
  out = train.train(c)
  assert out["step"] == SOURCE_STEPS + 2
  assert _records(w)[-2]["init"].startswith("resumed from") and _records(w)[-2]["step"] == 7
