"""Input/output faults end as one line, exit 2, no traceback and nothing half-written: a HF
config.json without a required key, garbage token files, an export of a missing step, a full
or read-only output volume (export, prepare, the demo corpus cache), an interrupted export, an
eval_batches the data cannot fill and a seq_len the host cannot hold.

Full and read-only volumes are real tmpfs mounts (tests.helpers.small_fs; needs root).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from jmid import cli, export, handoff, hf
from jmid import metrics as metrics_lib
from jmid.config import DataConfig, SourceConfig
from jmid.data import pipeline, prepare
from jmid.data.tokenfile import write_token_file
from jmid.errors import UserError
from tests.helpers import fill, run_configdict, small_fs, tiny_config, tiny_configdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def checksums(root: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under root."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(err: str, *expected: str) -> str:
  """The stderr of a failed command: no traceback, its last line `jmid: error: ...` holding
  every `expected` piece."""
  assert "Traceback" not in err, err[-3000:]
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert lines and lines[-1].startswith("jmid: error: "), err[-3000:]
  assert sum(l.startswith("jmid: error:") for l in lines) == 1, err[-3000:]
  for piece in expected:
    assert piece in lines[-1], lines[-1]
  return lines[-1]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
  """A demo corpus built once for the module (tests that damage one copy it first)."""
  from jmid.data import demo
  cache = str(tmp_path_factory.mktemp("cache"))
  demo.build_demo_corpus(cache)
  return cache


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> pathlib.Path:
  """A tiny run with a checkpoint at step 3, trained once for the module."""
  from jmid import train
  w = tmp_path_factory.mktemp("run") / "w"
  c = run_configdict(w, cache_dir, steps=3)
  c.train.eval_every_steps = 0  # no eval step to compile
  train.train(c)
  assert (w / "checkpoints" / "3").is_dir()
  return w


# 1. Hugging Face config.json -----------------------------------------------------------------

@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_hidden_layers",
                                 "num_attention_heads", "intermediate_size"])
def test_hf_config_without_a_required_key_names_the_file_and_key(tmp_path, key):
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in HF_CONFIG.items()
                                                    if k != key}))
  (tmp_path / "model.safetensors").write_bytes(b"")
  where = f"{tmp_path}/config.json: missing {key}"
  with pytest.raises(UserError, match=f"^{where}"):
    hf.set_model(tiny_configdict(), str(tmp_path))  # what a config file calls
  with pytest.raises(UserError, match=f"^{where}"):
    handoff.find(str(tmp_path))  # init.from_path
  with pytest.raises(UserError, match=f"missing {key}"):
    hf.model_fields({k: v for k, v in HF_CONFIG.items() if k != key})


def test_hf_config_with_bad_values_and_rope_without_factor(tmp_path):
  bad = {**HF_CONFIG, "hidden_size": "32", "num_attention_heads": 0}
  with pytest.raises(UserError, match=r"bad values hidden_size='32', num_attention_heads=0"):
    hf.model_fields(bad, str(tmp_path))
  linear = {**HF_CONFIG, "rope_scaling": {"type": "linear"}}
  with pytest.raises(UserError, match=r"RoPE scaling 'linear' needs factor \(missing\)"):
    hf.model_fields(linear, str(tmp_path))


def test_a_config_file_reading_a_broken_hf_folder_is_one_line(tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({k: v for k, v in HF_CONFIG.items()
                                                  if k != "hidden_size"}))
  (tmp_path / "cfg.py").write_text(
      "from configs import base\nfrom jmid import hf\n\n\ndef get_config(arg=None):\n"
      f"  return hf.set_model(base.get_config(), {str(folder)!r})\n")
  proc = run_module("jmid.train", f"--config={tmp_path / 'cfg.py'}",
                    f"--config.run.workdir={tmp_path / 'w'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = one_line(proc.stderr, f"{folder}/config.json: missing hidden_size")
  assert "override" not in line
  assert not (tmp_path / "w").exists()


def test_head_dim_0_agrees_with_the_folder_head_dim():
  model = tiny_config().model  # d_model 32, 4 heads, head_dim 0 (auto: 8)
  assert model.head_dim == 0 and model.dh == 8
  assert hf.contradictions(model, {**HF_CONFIG, "head_dim": 8}) == []
  assert hf.contradictions(model, HF_CONFIG) == []  # no head_dim key: d_model // heads
  assert hf.contradictions(model, {**HF_CONFIG, "head_dim": 16, "intermediate_size": 96}) == [
      "model.head_dim=0 (= 8) (config.json: 16)", "model.d_ff=64 (config.json: 96)"]


# 2. Garbage token files ----------------------------------------------------------------------

def _token_file(path: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  docs = [np.append(rng.integers(0, 256, int(rng.integers(5, 60))), 256) for _ in range(100)]
  write_token_file(str(path), docs, 258, extra_meta={"eos_id": 256, "tokenizer": "byte"})


def _random_bytes(path: pathlib.Path) -> None:
  path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))


def _garbage_offsets(path: pathlib.Path) -> None:  # a valid .npy, right ends, garbage between
  o = np.load(path / "offsets.npy")
  o[1:-1] = np.random.default_rng(2).integers(0, o[-1], len(o) - 2)
  np.save(path / "offsets.npy", o)


def _empty_documents(path: pathlib.Path) -> None:  # monotone, but every document but one empty
  o = np.load(path / "offsets.npy")
  o[1:-1] = 0
  np.save(path / "offsets.npy", o)


GARBAGE = {
    "every-file-random": (lambda p: [_random_bytes(f) for f in p.iterdir()], "meta.json"),
    "offsets-random": (lambda p: _random_bytes(p / "offsets.npy"), "offsets.npy: no .npy header"),
    "offsets-garbage-values": (_garbage_offsets, "offsets.npy: document"),
    "tokens-random": (lambda p: _random_bytes(p / "tokens.bin"), "tokens.bin: token 0 is id"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_a_garbage_token_file_is_named_with_how_to_rebuild(tmp_path, case, capsys):
  corrupt, where = GARBAGE[case]
  _token_file(tmp_path / "tf")
  corrupt(tmp_path / "tf")
  c = tiny_configdict(vocab_size=384)
  c.data.demo, c.run.workdir = False, str(tmp_path / "w")
  c.data.sources = {"a": {"path": str(tmp_path / "tf"), "weight": 1.0}}
  from jmid import train
  assert cli.run(lambda argv: train.train(c), []) == 2
  one_line(capsys.readouterr().err, f"{tmp_path / 'tf'}/{where}",
           f"{tmp_path / 'tf'} is not a valid jmid token file", "python -m jmid.data.prepare")
  assert not (tmp_path / "w").exists()


def test_empty_held_out_documents_are_not_a_single_document_source(tmp_path):
  _token_file(tmp_path / "tf")
  _empty_documents(tmp_path / "tf")
  cfg = DataConfig(sources={"a": SourceConfig(path=str(tmp_path / "tf"))}, demo=False,
                   cache_dir="", seq_len=16, eval_fraction=0.1, packing="concat", shuffle=True)
  srcs = pipeline.open_sources(cfg)
  assert pipeline.eval_batches(cfg, srcs, batch_size=2, n_batches=2, seed=0) == {"a": []}
  with pytest.raises(UserError, match=r"held-out documents of data.sources.a \(10\) are all "
                                      r"empty.*python -m jmid.data.prepare"):
    pipeline.unigram_loss(cfg, srcs, 0, 258)


def test_a_damaged_demo_corpus_says_delete_the_cache(tmp_path, cache_dir):
  from jmid.data import demo
  shutil.copytree(cache_dir, tmp_path / "cache")
  _random_bytes(tmp_path / "cache" / demo.VERSION / "math" / "offsets.npy")
  cfg = DataConfig(sources={}, demo=True, cache_dir=str(tmp_path / "cache"), seq_len=16,
                   eval_fraction=0.01, packing="concat", shuffle=True)
  with pytest.raises(UserError, match=rf"offsets.npy: no .npy header.*demo corpus: delete "
                                      rf"{tmp_path / 'cache' / demo.VERSION} and run again"):
    pipeline.open_sources(cfg)


# 3, 4. Export --------------------------------------------------------------------------------

def test_export_of_a_missing_step_lists_the_steps(workdir, tmp_path, capsys):
  before = checksums(workdir)
  assert export.main([f"--workdir={workdir}", "--step=7", f"--out={tmp_path / 'hf'}"]) == 2
  one_line(capsys.readouterr().err, f"--step=7: step 7 is not in {workdir}/checkpoints; the "
                                    "steps there are 3")
  assert os.listdir(tmp_path) == [] and checksums(workdir) == before


def test_export_to_a_full_disk_leaves_nothing(workdir, tmp_path):
  """Through the real process: one line, exit 2, the volume as full as before, nothing left."""
  before = checksums(workdir)
  with small_fs(tmp_path / "full", 256) as vol:
    fill(vol)
    proc = run_module("jmid.export", f"--workdir={workdir}", f"--out={vol / 'new' / 'hf'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_line(proc.stderr, f"--out={vol / 'new' / 'hf'}: no space left on the device")
    assert os.listdir(vol) == ["filler"]  # no temp folder, no parent folder it made
  assert checksums(workdir) == before


def test_export_to_a_read_only_volume_is_one_line(workdir, tmp_path, capsys):
  with small_fs(tmp_path / "ro", 64, readonly=True) as vol:
    assert export.main([f"--workdir={workdir}", f"--out={vol / 'hf'}"]) == 2
    one_line(capsys.readouterr().err, f"--out={vol / 'hf'}: read-only filesystem")
    assert os.listdir(vol) == []


def test_interrupted_export_removes_its_temp_folder_only(workdir, tmp_path, capsys, monkeypatch):
  (tmp_path / "hf.tmp").mkdir()  # someone else's: an export never deletes what it did not make
  (tmp_path / "hf.tmp" / "keep").write_text("x")
  from jmid import hf_write  # the writer behind the export CLI
  leaves = hf_write._checkpoint_leaves

  def signalled(step_dir):  # SIGTERM arrives after the first array is written
    for k, (key, a) in enumerate(leaves(step_dir)):
      if k == 1:
        cli.STOP(signal.SIGTERM, None)
      yield key, a

  monkeypatch.setattr(hf_write, "_checkpoint_leaves", signalled)
  assert export.main([f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"]) == 128 + 15
  assert "SIGTERM" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["hf.tmp"] and os.listdir(tmp_path / "hf.tmp") == ["keep"]

  def broken(step_dir):
    yield from list(leaves(step_dir))[:2]
    raise RuntimeError("a bug mid-way")

  monkeypatch.setattr(hf_write, "_checkpoint_leaves", broken)
  with pytest.raises(RuntimeError):
    export.export(str(workdir), str(tmp_path / "a" / "b" / "hf"))
  assert sorted(os.listdir(tmp_path)) == ["hf.tmp"]  # nor the parent folders it made


# 4. prepare and the demo corpus cache --------------------------------------------------------

@pytest.fixture
def inputs(tmp_path) -> pathlib.Path:
  d = tmp_path / "in"
  d.mkdir()
  (d / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n"
                                     for i in range(300)))
  return d


def test_prepare_to_a_full_disk_leaves_nothing(inputs, tmp_path):
  before = checksums(inputs)
  with small_fs(tmp_path / "full", 64) as vol:
    fill(vol)
    out = vol / "sub" / "tok"
    proc = run_module("jmid.data.prepare", f"--input={inputs}/a.jsonl", f"--out={out}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_line(proc.stderr, f"--out={out}: no space left on the device")
    assert os.listdir(vol) == ["filler"]
  assert checksums(inputs) == before


def test_prepare_to_a_read_only_volume_is_one_line(inputs, tmp_path, capsys):
  before = checksums(inputs)
  with small_fs(tmp_path / "ro", 64, readonly=True) as vol:
    assert prepare.main([f"--input={inputs}/a.jsonl", f"--out={vol / 'tok'}"]) == 2
    one_line(capsys.readouterr().err, f"--out={vol / 'tok'}: read-only filesystem")
    assert os.listdir(vol) == []
  assert checksums(inputs) == before


@pytest.mark.parametrize("readonly", [True, False], ids=["read-only", "full"])
def test_demo_cache_on_a_read_only_or_full_volume(tmp_path, capsys, readonly):
  with small_fs(tmp_path / "vol", 512, readonly=readonly) as vol:
    if not readonly:
      fill(vol)
    cache = vol / "cache"
    cfg = DataConfig(sources={}, demo=True, cache_dir=str(cache), seq_len=16,
                     eval_fraction=0.01, packing="concat", shuffle=True)
    assert cli.run(lambda argv: pipeline.open_sources(cfg), []) == 2
    cause = "read-only filesystem" if readonly else "no space left on the device"
    one_line(capsys.readouterr().err, f"data.cache_dir={cache}: {cause}")
    left = sorted(str(p.relative_to(vol)) for p in vol.rglob("*"))
    assert left == ([] if readonly else ["cache", "cache/demo-v2.lock", "filler"])


# 5, 6. Eval batches and seq_len --------------------------------------------------------------

def _small_source(tmp_path: pathlib.Path, **kw: object) -> tuple[DataConfig, pipeline.Sources]:
  _token_file(tmp_path / "tf")
  cfg = DataConfig(sources={"a": SourceConfig(path=str(tmp_path / "tf"))}, demo=False,
                   cache_dir="", eval_fraction=0.1, packing="concat", shuffle=True,
                   **{"seq_len": 16, **kw})
  return cfg, pipeline.open_sources(cfg)


def test_eval_batches_are_bounded_by_one_pass_over_the_held_out_set(tmp_path):
  cfg, srcs = _small_source(tmp_path)
  _, (src, held) = pipeline._splits(srcs, "a", cfg.eval_fraction, 0)
  tokens = int(src.doc_lengths(held).sum())
  want = max(1, tokens // (4 * 17))  # rows of seq_len + 1 tokens, 2 rows x 2 processes
  counts = [len(pipeline.eval_batches(cfg, srcs, batch_size=2, n_batches=10**8, seed=0,
                                      process_index=i, process_count=2)["a"]) for i in (0, 1)]
  assert counts == [want, want] and want >= 1
  assert len(pipeline.eval_batches(cfg, srcs, batch_size=2, n_batches=1, seed=0)["a"]) == 1
  assert len(pipeline.eval_batches(cfg, srcs, batch_size=64, n_batches=5, seed=0)["a"]) == 1


def test_a_seq_len_the_host_cannot_hold_is_one_line(tmp_path):
  cfg, srcs = _small_source(tmp_path, seq_len=10**9)
  with pytest.raises(UserError, match=r"^data.seq_len=1000000000: the data pipeline alone needs "
                                      r"about [\d,.]+ GiB of host memory"):
    pipeline.train_iterator(cfg, srcs, batch_size=8, seed=0)
  with pytest.raises(UserError, match=r"^data.seq_len=1000000000"):
    pipeline.eval_batches(cfg, srcs, batch_size=8, n_batches=1, seed=0)


def test_a_packer_that_cannot_allocate_fails_once(monkeypatch):
  """A MemoryError while building the mixture's iterators is the only error: no second
  traceback from grain's __del__ on the half-built iterator ('Exception ignored in ...')."""
  import gc

  import grain

  from jmid.data import mixture

  class NoMemory(grain.IterDataset):
    def __init__(self) -> None:
      super().__init__([])

    def __iter__(self):
      raise MemoryError("Unable to allocate 119. GiB")

  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  sched = mixture.Schedule(["a"], ((0, {"a": 1.0}),), "step")
  with pytest.raises(MemoryError):
    iter(mixture.ScheduledMixIterDataset([NoMemory()], sched, 2, 0))
  gc.collect()
  assert unraisable == []


def test_metrics_on_a_full_disk_fail_in_the_caller_naming_the_file(tmp_path):
  # TensorBoard events are flushed by the writer itself, not by a thread whose failure would be
  # a traceback nobody can catch: the loop gets one OSError naming where it could not write
  with small_fs(tmp_path / "vol", 256) as vol:
    writer = metrics_lib.MetricsWriter(str(vol / "run"), 10, 0)
    writer.write(1, {"loss": 1.0}, console=False)
    fill(vol)
    with pytest.raises(OSError) as e:  # more than the slack left in each file's last page
      writer.write(2, {f"eval/source{i}/loss": 1.0 for i in range(400)}, console=False)
    assert e.value.errno == errno.ENOSPC
    run = vol / "run"
    assert e.value.filename in (str(run / "metrics.jsonl"), str(run / "tensorboard"))
