"""Token files, the byte tokenizer and the train/eval split.

Test documents encode their identity: token j of document d is d * 1000 + j, so a packed row
tells which document (token // 1000) and which offset (token % 1000) every token came from.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from jmid.errors import UserError
from jmid.data import pipeline
from jmid.data.tokenfile import TokenFile, write_token_file
from jmid.data.tokenizer import ByteTokenizer

VOCAB = 1_000_000  # > 65536: these pipeline tests also exercise uint32 token files


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
