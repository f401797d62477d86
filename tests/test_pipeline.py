"""Packing, the scheduled mixture pipeline, eval batches and the demo corpus.

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

from jmid.config import DataConfig, SourceConfig
from jmid.errors import UserError
from jmid.data import demo, pipeline
from jmid.data.tokenfile import TokenFile, write_token_file
from jmid.data.tokenizer import ByteTokenizer

VOCAB = 1_000_000  # > 65536: these pipeline tests also exercise uint32 token files


def make_source(path: str, ids: range, seed: int, max_len: int = 120) -> str:
  rng = np.random.default_rng(seed)
  docs = [d * 1000 + np.arange(int(rng.integers(1, max_len))) for d in ids]
  write_token_file(path, docs, VOCAB)
  return path


def data_cfg(paths: dict[str, str], weights: dict[str, float], **kw: object) -> DataConfig:
  base = dict(demo=False, cache_dir="", seq_len=32, eval_fraction=0.1, packing="concat",
              shuffle=True)
  base.update(kw)
  return DataConfig(sources={n: SourceConfig(path=paths[n], weight=w)
                             for n, w in weights.items()}, **base)


def train_it(cfg: DataConfig, **kw: object):
  return pipeline.train_iterator(cfg, pipeline.open_sources(cfg), **kw)


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


# Pipelines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_packed_batch_invariants(tmp_path, packing):
  # Documents up to 150 tokens with seq_len 32: many must be split to fit a row.
  paths = {"a": make_source(str(tmp_path / "a"), range(0, 40), 1, max_len=150)}
  cfg = data_cfg(paths, {"a": 1.0}, packing=packing)
  it = train_it(cfg, batch_size=4, seed=0)
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
  cfg = data_cfg(paths, {"a": 1.0}, eval_fraction=0.1)
  train, _ = pipeline.split_indices(30, 0.1, 0)
  it = train_it(cfg, batch_size=2, seed=0)
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
  b = next(train_it(cfg_fixed, batch_size=2, seed=0))
  assert b["inputs"][0, 0] == train[0] * 1000


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
@pytest.mark.parametrize("consumed", [1, 4, 23])
def test_resume_reproduces_next_batches(two_sources, packing, consumed):
  """The state goes through JSON, as in a checkpoint (grain keeps tuples JSON makes lists)."""
  cfg = data_cfg(two_sources, {"a": 0.5, "b": 0.5}, packing=packing)
  it = train_it(cfg, batch_size=3, seed=7)
  skip(it, consumed)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  fresh = train_it(cfg, batch_size=3, seed=7)
  fresh.set_state(state)
  for want, got in zip(expected, [next(fresh) for _ in expected]):
    assert all(np.array_equal(got[k], want[k]) for k in want)
  other_seed = train_it(cfg, batch_size=3, seed=8)
  assert not np.array_equal(next(other_seed)["inputs"], next(
      train_it(cfg, batch_size=3, seed=7))["inputs"])


def test_iterator_checkpoints_with_orbax(two_sources, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  cfg = data_cfg(two_sources, {"a": 0.5, "b": 0.5})
  it = train_it(cfg, batch_size=2, seed=0)
  skip(it, 11)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = next(it)
  fresh = train_it(cfg, batch_size=2, seed=0)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  got = next(fresh)
  assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_process_shards_are_disjoint(two_sources):
  cfg = data_cfg(two_sources, {"a": 0.5, "b": 0.5})
  seen = []
  for p in range(2):
    it = train_it(cfg, batch_size=4, seed=0, process_index=p,
                                 process_count=2)
    seen.append(set().union(*(doc_ids(next(it)) for _ in range(60))))
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  train = {int(d) + off for off in (0, 500)
           for d in pipeline.split_indices(60, 0.1, 0)[0]}
  assert seen[0] | seen[1] == train  # together the shards cover the whole train split


def test_eval_batches_fixed_and_held_out(two_sources):
  cfg = data_cfg(two_sources, {"a": 0.5, "b": 0.0})  # weight 0: not trained on, still evaluated
  ev = pipeline.eval_batches(cfg, pipeline.open_sources(cfg), batch_size=2, n_batches=2, seed=0)
  again = pipeline.eval_batches(cfg, pipeline.open_sources(cfg), batch_size=2, n_batches=2, seed=0)
  assert set(ev) == {"a", "b"} and all(len(v) == 2 for v in ev.values())
  for name in ev:
    for x, y in zip(ev[name], again[name]):
      check_invariants(x, 2, 32)
      assert all(np.array_equal(x[k], y[k]) for k in x)
  train, held = pipeline.split_indices(60, 0.1, 0)
  ids = set().union(*(doc_ids(b) for b in ev["a"]))
  assert ids and ids <= set(held.tolist()) and not ids & set(train.tolist())
  it = train_it(cfg, batch_size=4, seed=0)
  trained = set().union(*(doc_ids(next(it)) for _ in range(50)))
  assert trained <= set(train.tolist())  # only source a, only train docs


def test_shuffle_seed_changes_the_order_and_keeps_the_split(two_sources):
  """A stage branched from a run sets its own order; its held-out documents stay held out."""
  cfg = data_cfg(two_sources, {"a": 0.5, "b": 0.5})
  train, _ = pipeline.split_indices(60, 0.1, 0)
  allowed = set(train.tolist()) | {d + 500 for d in pipeline.split_indices(60, 0.1, 0)[0]}

  def first(c: DataConfig, n: int = 6) -> list[np.ndarray]:
    it = train_it(c, batch_size=4, seed=0)
    return [next(it)["inputs"] for _ in range(n)]

  same = first(dataclasses.replace(cfg, shuffle_seed=0))  # run.seed given explicitly
  other = first(dataclasses.replace(cfg, shuffle_seed=7))
  assert all(np.array_equal(x, y) for x, y in zip(first(cfg), same))
  assert not any(np.array_equal(x, y) for x, y in zip(same, other))
  assert set().union(*(set((b[b != 0] // 1000).tolist()) for b in other)) <= allowed


def test_mixture_weights_give_row_shares(two_sources):
  cfg = data_cfg(two_sources, {"a": 0.75, "b": 0.25})
  it = train_it(cfg, batch_size=8, seed=0)
  first_tokens = np.concatenate([next(it)["inputs"][:, 0] for _ in range(50)])  # 400 rows
  assert abs(np.mean(first_tokens < 500_000) - 0.75) < 0.03  # rows of source a


def test_unigram_loss_matches_hand_computation(tmp_path):
  docs = [[1, 1, 2], [2, 3], [1, 1, 1, 1], [0, 3]]
  write_token_file(str(tmp_path / "u"), docs, 4)
  train, held = pipeline.split_indices(4, 0.25, seed=0)
  counts = np.bincount(np.concatenate([docs[i] for i in train]), minlength=4) + 1.0
  held_tokens = np.concatenate([docs[i] for i in held])
  want = -np.mean(np.log(counts[held_tokens] / counts.sum()))
  cfg = data_cfg({"u": str(tmp_path / "u")}, {"u": 1.0}, eval_fraction=0.25)
  got = pipeline.unigram_loss(cfg, pipeline.open_sources(cfg), 0, 4)
  assert got == pytest.approx(want, rel=1e-9)


def test_vocab_check_names_the_source(two_sources):
  cfg = data_cfg(two_sources, {"a": 1.0, "b": 1.0})
  srcs = pipeline.open_sources(cfg)
  pipeline.check_vocab(srcs, 600_000)
  with pytest.raises(UserError, match=r"data\.sources\.b: holds token id 559\d+ >= "):
    pipeline.check_vocab(srcs, 500_000)
  with pytest.raises(UserError, match="data.tokenizer has 258 tokens"):
    pipeline.check_vocab(srcs, 100)


def test_source_errors_name_the_key(tmp_path, two_sources):
  cfg = data_cfg({**two_sources, "web": str(tmp_path / "nope")}, {"a": 1.0, "web": 1.0})
  with pytest.raises(UserError, match=r"data\.sources\.web\.path"):
    pipeline.open_sources(cfg)
  write_token_file(str(tmp_path / "empty"), [], VOCAB)
  cfg = data_cfg({**two_sources, "e": str(tmp_path / "empty")}, {"a": 1.0, "e": 1.0})
  with pytest.raises(UserError, match=r"data\.sources\.e"):
    pipeline.open_sources(cfg)
  cfg = data_cfg(two_sources, {"a": 0.0, "b": 0.0})
  with pytest.raises(UserError, match="weight 0"):
    train_it(cfg, batch_size=2, seed=0)


def test_chat_prompts_get_no_loss_through_packing(tmp_path):
  """A token file with masks (as prepare writes for chat): loss_mask follows the target's mask."""
  rng = np.random.default_rng(0)
  docs = []
  for d in range(40):
    n = int(rng.integers(10, 60))
    tokens = d * 1000 + np.arange(n)
    mask = (np.arange(n) >= n // 2).astype(np.int32)  # first half is the "prompt"
    docs.append((tokens, mask))
  write_token_file(str(tmp_path / "c"), docs, VOCAB)
  for packing in ("concat", "first_fit"):
    cfg = dataclasses.replace(data_cfg({}, {}, packing=packing), sources={
        "c": SourceConfig(path=str(tmp_path / "c"), kind="chat")})
    it = train_it(cfg, batch_size=4, seed=0)
    lengths = {d: len(t) for d, (t, _) in enumerate(docs)}
    for _ in range(20):
      b = next(it)
      tgt, mask, seg = b["targets"], b["loss_mask"], b["segment_ids"]
      doc, offset = tgt // 1000, tgt % 1000
      # same document, and not the first token of a piece (documents longer than a row are cut
      # into pieces of seq_len + 1 = 33 tokens, each its own segment)
      same_doc = (seg != 0) & (doc == b["inputs"] // 1000) & (offset % 33 != 0)
      in_answer = np.array([[o >= lengths[int(dd)] // 2 for dd, o in zip(r_d, r_o)]
                            for r_d, r_o in zip(doc, offset)])
      assert (mask == (same_doc & in_answer)).all()
      # first-fit whatever data.packing says: an example that fits a row is never cut
      for r in range(4):
        for sid in set(seg[r].tolist()) - {0}:
          d = set((b["inputs"][r][seg[r] == sid] // 1000).tolist())
          (dd,) = d
          if lengths[dd] <= 33:  # the row's last token is only in targets, after the shift
            tail = int(seg[r][-1] == sid and tgt[r][-1] // 1000 == dd)
            assert (seg[r] == sid).sum() + tail == lengths[dd]


def test_bytes_per_token_of_demo_sources(demo_dir):
  cfg = DataConfig(demo=True, cache_dir=demo_dir, sources={}, seq_len=64, eval_fraction=0.02,
                   packing="concat", shuffle=True)
  bpt = pipeline.bytes_per_token(cfg, pipeline.open_sources(cfg), seed=0)
  for name in ("code", "math", "text"):
    assert 0.95 < bpt[name] < 1.0  # bytes tokens, less the EOS each document ends with
  assert 0.8 < bpt["chat"] < 1.0  # ChatML markers are text too, but the mask is not bytes


# Demo corpus ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
  cache = str(tmp_path_factory.mktemp("demo-cache"))
  demo.build_demo_corpus(cache)
  return cache


def _files(root: str) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def test_demo_corpus_has_four_sources(demo_dir):
  paths = demo.build_demo_corpus(demo_dir)  # second call: already built, just paths
  assert set(paths) == {"code", "math", "text", "chat"}
  tok = ByteTokenizer()
  for name, path in paths.items():
    tf = TokenFile(path)
    assert tf.vocab_size == 258 and 1_000_000 < tf.n_tokens < 8_000_000, name
    assert all(tf[i][-1] == tok.EOS for i in (0, len(tf) // 2, len(tf) - 1))
  assert tok.decode(TokenFile(paths["math"])[0]).startswith("Q: ")
  chat = TokenFile(paths["chat"])
  trained = tok.decode(chat[0][chat.mask(0) == 1])
  assert "<|im_start|>" not in trained and "<|im_end|>" in trained
  cfg = DataConfig(demo=True, cache_dir=demo_dir, sources={"math": SourceConfig("", 2.0)},
                   seq_len=64, eval_fraction=0.02, packing="concat", shuffle=True)
  srcs = pipeline.open_sources(cfg)
  assert {n: s.weight for n, s in srcs.specs.items()} == \
      {"code": 0.0, "math": 2.0, "text": 0.0, "chat": 0.0}
  default = dataclasses.replace(cfg, sources={})
  assert {n: s.weight for n, s in pipeline.open_sources(default).specs.items()} == \
      demo.DEFAULT_WEIGHTS
  assert pipeline.unigram_loss(cfg, srcs, 0, 258) > 2.0


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
  assert sorted(os.listdir(cache)) == [demo.VERSION, demo.VERSION + ".lock"]  # no temp dirs left
  assert _files(os.path.join(cache, demo.VERSION)) == \
      _files(os.path.join(demo_dir, demo.VERSION))
