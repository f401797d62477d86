"""Token files, the byte tokenizer, packing/mixing pipelines and the demo corpus.

Test documents encode their identity: token j of document d is d * 1000 + j, so a packed row
tells which document (token // 1000) and which offset (token % 1000) every token came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jmid.config import DataConfig, SourceConfig, UserError
from jmid.data import demo, pipeline
from jmid.data.tokenfile import TokenFile, write_token_file
from jmid.data.tokenizer import ByteTokenizer

VOCAB = 1_000_000  # > 65536: these pipeline tests also exercise uint32 token files


def make_source(path: str, ids: range, seed: int, max_len: int = 120) -> str:
  rng = np.random.default_rng(seed)
  docs = [d * 1000 + np.arange(int(rng.integers(1, max_len))) for d in ids]
  write_token_file(path, docs, VOCAB)
  return path


def data_cfg(sources: dict[str, float], **kw: object) -> DataConfig:
  base = dict(demo=False, cache_dir="", seq_len=32, eval_fraction=0.1, packing="concat",
              shuffle=True)
  base.update(kw)
  return DataConfig(sources={n: SourceConfig(path="", weight=w) for n, w in sources.items()},
                    **base)


@pytest.fixture
def two_sources(tmp_path) -> dict[str, str]:
  return {"a": make_source(str(tmp_path / "a"), range(0, 60), 1, max_len=90),
          "b": make_source(str(tmp_path / "b"), range(500, 560), 2, max_len=90)}


def skip(it: Iterator[object], n: int) -> None:
  for _ in range(n):
    next(it)


def doc_ids(batch: dict[str, np.ndarray]) -> set[int]:
  return set((batch["inputs"][batch["segment_ids"] != 0] // 1000).tolist())


def check_invariants(batch: dict[str, np.ndarray], batch_size: int, seq_len: int) -> None:
  keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
  assert all(batch[k].shape == (batch_size, seq_len) and batch[k].dtype == np.int32 for k in keys)
  inp, tgt, seg, pos, mask = (batch[k] for k in keys)
  pad = seg == 0
  assert not mask[pad].any() and set(np.unique(mask)) <= {0, 1}
  # Positions restart at 0 at every segment change and count up inside a segment, where the
  # tokens are consecutive pieces of one document.
  start = np.ones_like(pad)
  start[:, 1:] = seg[:, 1:] != seg[:, :-1]
  assert (pos[start & ~pad] == 0).all()
  inside = ~start[:, 1:] & ~pad[:, 1:]
  assert (pos[:, 1:][inside] == pos[:, :-1][inside] + 1).all()
  assert (inp[:, 1:][inside] == inp[:, :-1][inside] + 1).all()
  # A target counts exactly when it is the next input of the same document.
  nxt = (seg[:, 1:] == seg[:, :-1]) & ~pad[:, :-1]
  assert (mask[:, :-1] == nxt).all()
  assert (tgt[:, :-1][nxt] == inp[:, 1:][nxt]).all()
  assert (tgt[mask == 1] == inp[mask == 1] + 1).all()


# Token files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,dtype", [(258, "uint16"), (70_000, "uint32")])
def test_token_file_round_trip(tmp_path, vocab, dtype):
  docs = [np.array([1, 2, 3]), [], [vocab - 1, 0], np.arange(50) % vocab]
  meta = write_token_file(str(tmp_path / "tf"), docs, vocab)
  tf = TokenFile(str(tmp_path / "tf"))
  assert meta == tf.meta and meta["dtype"] == dtype and meta["n_docs"] == 4
  assert len(tf) == 4 and tf.n_tokens == 55
  assert os.path.getsize(tmp_path / "tf" / "tokens.bin") == 55 * np.dtype(dtype).itemsize
  for i, d in enumerate(docs):
    assert tf[i].dtype == np.int32 and tf[i].tolist() == list(np.asarray(d, np.int64))
  assert tf[-1].tolist() == tf[3].tolist()
  with pytest.raises(IndexError):
    tf[4]


def test_write_rejects_bad_ids_and_leaves_nothing(tmp_path):
  for bad in ([[1, 2], [258]], [[-1]]):
    with pytest.raises(UserError, match="outside"):
      write_token_file(str(tmp_path / "tf"), bad, 258)
  assert os.listdir(tmp_path) == []


def test_write_is_atomic(tmp_path):
  def docs():
    yield [1, 2, 3]
    raise RuntimeError("crash mid-write")

  with pytest.raises(RuntimeError):
    write_token_file(str(tmp_path / "tf"), docs(), 258)
  assert os.listdir(tmp_path) == []
  write_token_file(str(tmp_path / "tf"), [[1]], 258)
  with pytest.raises(UserError, match="already exists"):
    write_token_file(str(tmp_path / "tf"), [[2]], 258)
  write_token_file(str(tmp_path / "tf"), [[2, 3]], 258, overwrite=True)
  assert TokenFile(str(tmp_path / "tf"))[0].tolist() == [2, 3]
  assert os.listdir(tmp_path) == ["tf"]


def test_broken_token_files_raise_user_error(tmp_path):
  path = str(tmp_path / "tf")
  with pytest.raises(UserError, match="no such token-file directory"):
    TokenFile(path)
  write_token_file(path, [[1, 2, 3], [4, 5]], 258)
  with open(os.path.join(path, "tokens.bin"), "r+b") as f:
    f.truncate(6)
  with pytest.raises(UserError, match=f"{path}/tokens.bin.*truncated"):
    TokenFile(path)
  with open(os.path.join(path, "meta.json"), "w") as f:
    f.write('{"format": "something-else"}')
  with pytest.raises(UserError, match="format"):
    TokenFile(path)
  os.remove(os.path.join(path, "meta.json"))
  with pytest.raises(UserError, match="meta.json is missing"):
    TokenFile(path)


def test_byte_tokenizer():
  tok = ByteTokenizer()
  ids = tok.encode("héllo ∑")
  assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len("héllo ∑".encode())
  assert tok.decode(np.concatenate([[tok.BOS], ids, [tok.EOS]])) == "héllo ∑"
  assert tok.decode([0xFF]) == "\ufffd" and tok.vocab_size == 258


def test_split_indices():
  train, held = pipeline.split_indices(1000, 0.05, seed=3)
  assert len(held) == 50 and len(np.intersect1d(train, held)) == 0
  assert sorted(np.concatenate([train, held]).tolist()) == list(range(1000))
  assert (pipeline.split_indices(1000, 0.05, seed=3)[1] == held).all()
  assert not np.array_equal(pipeline.split_indices(1000, 0.05, seed=4)[1], held)
  assert set(held) <= set(pipeline.split_indices(1000, 0.2, seed=3)[1])  # nested
  assert [len(x) for x in pipeline.split_indices(2, 0.01, 0)] == [1, 1]
  assert [len(x) for x in pipeline.split_indices(1, 0.5, 0)] == [1, 0]


# Pipelines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_packed_batch_invariants(tmp_path, packing):
  # Documents up to 150 tokens with seq_len 32: many must be split to fit a row.
  paths = {"a": make_source(str(tmp_path / "a"), range(0, 40), 1, max_len=150)}
  cfg = data_cfg({"a": 1.0}, packing=packing)
  it = pipeline.train_iterator(cfg, paths, batch_size=4, seed=0)
  segs_per_row = []
  for _ in range(30):
    b = next(it)
    check_invariants(b, 4, 32)
    segs_per_row += b["segment_ids"].max(axis=1).tolist()
  assert max(segs_per_row) > 1  # rows really hold several documents
  if packing == "concat":
    assert (b["segment_ids"] != 0).all()  # concat-then-split never pads an endless stream


def test_shuffle_differs_per_epoch(tmp_path):
  paths = {"a": make_source(str(tmp_path / "a"), range(0, 30), 1, max_len=20)}
  cfg = data_cfg({"a": 1.0}, eval_fraction=0.1)
  train, _ = pipeline.split_indices(30, 0.1, 0)
  it = pipeline.train_iterator(cfg, paths, batch_size=2, seed=0)
  order: list[int] = []
  while len(order) < 3 * len(train):
    b = next(it)
    assert (b["segment_ids"] != 0).all()  # concat: no padding, so token 0 is doc 0's start
    rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)  # the packed rows
    order += (rows[rows % 1000 == 0] // 1000).tolist()  # first tokens, in stream order
  epochs = [order[i * len(train):(i + 1) * len(train)] for i in range(3)]
  for e in epochs:
    assert sorted(e) == sorted(train.tolist())  # each epoch sees every train doc once
  assert epochs[0] != epochs[1] != epochs[2]  # and in a new order
  cfg_fixed = dataclasses.replace(cfg, shuffle=False)
  b = next(pipeline.train_iterator(cfg_fixed, paths, batch_size=2, seed=0))
  assert b["inputs"][0, 0] == train[0] * 1000


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
@pytest.mark.parametrize("consumed", [1, 4, 23])
def test_resume_reproduces_next_batches(two_sources, packing, consumed):
  """The state goes through JSON, as in a checkpoint (grain keeps tuples JSON makes lists)."""
  cfg = data_cfg({"a": 0.5, "b": 0.5}, packing=packing)
  it = pipeline.train_iterator(cfg, two_sources, batch_size=3, seed=7)
  skip(it, consumed)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  fresh = pipeline.train_iterator(cfg, two_sources, batch_size=3, seed=7)
  fresh.set_state(state)
  for want, got in zip(expected, [next(fresh) for _ in expected]):
    assert all(np.array_equal(got[k], want[k]) for k in want)
  other_seed = pipeline.train_iterator(cfg, two_sources, batch_size=3, seed=8)
  assert not np.array_equal(next(other_seed)["inputs"], next(
      pipeline.train_iterator(cfg, two_sources, batch_size=3, seed=7))["inputs"])


def test_iterator_checkpoints_with_orbax(two_sources, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  cfg = data_cfg({"a": 0.5, "b": 0.5})
  it = pipeline.train_iterator(cfg, two_sources, batch_size=2, seed=0)
  skip(it, 11)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = next(it)
  fresh = pipeline.train_iterator(cfg, two_sources, batch_size=2, seed=0)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  got = next(fresh)
  assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_process_shards_are_disjoint(two_sources):
  cfg = data_cfg({"a": 0.5, "b": 0.5})
  seen = []
  for p in range(2):
    it = pipeline.train_iterator(cfg, two_sources, batch_size=4, seed=0, process_index=p,
                                 process_count=2)
    seen.append(set().union(*(doc_ids(next(it)) for _ in range(60))))
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  train = {int(d) + off for off in (0, 500)
           for d in pipeline.split_indices(60, 0.1, 0)[0]}
  assert seen[0] | seen[1] == train  # together the shards cover the whole train split


def test_eval_batches_fixed_and_held_out(two_sources):
  cfg = data_cfg({"a": 0.5, "b": 0.0})  # weight 0: not trained on, still evaluated
  ev = pipeline.eval_batches(cfg, two_sources, batch_size=2, n_batches=3, seed=0)
  again = pipeline.eval_batches(cfg, two_sources, batch_size=2, n_batches=3, seed=0)
  assert set(ev) == {"a", "b"} and all(len(v) == 3 for v in ev.values())
  for name in ev:
    for x, y in zip(ev[name], again[name]):
      check_invariants(x, 2, 32)
      assert all(np.array_equal(x[k], y[k]) for k in x)
  train, held = pipeline.split_indices(60, 0.1, 0)
  ids = set().union(*(doc_ids(b) for b in ev["a"]))
  assert ids and ids <= set(held.tolist()) and not ids & set(train.tolist())
  it = pipeline.train_iterator(cfg, two_sources, batch_size=4, seed=0)
  trained = set().union(*(doc_ids(next(it)) for _ in range(50)))
  assert trained <= set(train.tolist())  # only source a, only train docs


def test_mixture_weights_give_row_shares(two_sources):
  cfg = data_cfg({"a": 0.75, "b": 0.25})
  it = pipeline.train_iterator(cfg, two_sources, batch_size=8, seed=0)
  first_tokens = np.concatenate([next(it)["inputs"][:, 0] for _ in range(50)])  # 400 rows
  assert abs(np.mean(first_tokens < 500_000) - 0.75) < 0.03  # rows of source a


def test_unigram_loss_matches_hand_computation(tmp_path):
  docs = [[1, 1, 2], [2, 3], [1, 1, 1, 1], [0, 3]]
  write_token_file(str(tmp_path / "u"), docs, 4)
  train, held = pipeline.split_indices(4, 0.25, seed=0)
  counts = np.bincount(np.concatenate([docs[i] for i in train]), minlength=4) + 1.0
  held_tokens = np.concatenate([docs[i] for i in held])
  want = -np.mean(np.log(counts[held_tokens] / counts.sum()))
  got = pipeline.unigram_loss({"u": str(tmp_path / "u")}, 0.25, 0, 4)
  assert got == pytest.approx(want, rel=1e-9)
  with pytest.raises(UserError, match="vocab_size"):
    pipeline.unigram_loss({"u": str(tmp_path / "u")}, 0.25, 0, 3)


def test_resolve_sources_errors_name_the_key(tmp_path, two_sources):
  cfg = dataclasses.replace(data_cfg({}), sources={
      "a": SourceConfig(path=two_sources["a"], weight=1.0),
      "web": SourceConfig(path=str(tmp_path / "nope"), weight=1.0)})
  with pytest.raises(UserError, match=r"data\.sources\.web\.path: .*nope"):
    pipeline.resolve_sources(cfg)
  cfg = dataclasses.replace(cfg, sources={"a": cfg.sources["a"]})
  assert pipeline.resolve_sources(cfg) == {"a": two_sources["a"]}


# Demo corpus ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
  cache = str(tmp_path_factory.mktemp("demo-cache"))
  demo.build_demo_corpus(cache)
  return cache


def _files(root: str) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def test_demo_corpus_has_three_sources(demo_dir):
  paths = demo.build_demo_corpus(demo_dir)  # second call: already built, just paths
  assert set(paths) == {"code", "math", "text"}
  tok = ByteTokenizer()
  for name, path in paths.items():
    tf = TokenFile(path)
    assert tf.vocab_size == 258 and 1_000_000 < tf.n_tokens < 8_000_000, name
    assert all(tf[i][-1] == tok.EOS for i in (0, len(tf) // 2, len(tf) - 1))
  assert tok.decode(TokenFile(paths["math"])[0]).startswith("Q: ")
  cfg = DataConfig(demo=True, cache_dir=demo_dir, sources={"math": SourceConfig("", 2.0)},
                   seq_len=64, eval_fraction=0.02, packing="concat", shuffle=True)
  assert pipeline.resolve_sources(cfg) == paths
  assert pipeline.source_weights(cfg, paths) == {"code": 0.0, "math": 2.0, "text": 0.0}
  assert pipeline.unigram_loss(paths, 0.02, 0, 258) > 2.0


def test_demo_corpus_is_deterministic_under_concurrent_builds(demo_dir, tmp_path):
  cache = str(tmp_path / "cache")
  results: list[dict[str, str]] = []
  threads = [threading.Thread(target=lambda: results.append(demo.build_demo_corpus(cache)))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(results) == 2 and results[0] == results[1]
  assert sorted(os.listdir(cache)) == ["demo-v1", "demo-v1.lock"]  # no temp dirs left
  assert _files(os.path.join(cache, "demo-v1")) == _files(os.path.join(demo_dir, "demo-v1"))
