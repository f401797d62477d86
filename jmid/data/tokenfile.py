"""jmid's token-file format: a directory a training run can memory-map without parsing.

Layout of `<dir>/`:
  tokens.bin   every document's tokens back to back (uint16 if vocab_size <= 65536, else uint32)
  offsets.npy  int64 [n_docs + 1]; document i is tokens[offsets[i]:offsets[i + 1]]
  meta.json    {"format": "jmid-tokens-v1", "dtype", "n_docs", "n_tokens", "vocab_size"}

meta.json is written last and the directory appears by one rename, so a directory with a
meta.json is complete: an interrupted write leaves only a `*.tmp-*` sibling behind.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jmid.config import UserError

FORMAT = "jmid-tokens-v1"
_FIX = "rewrite it with jmid.data.tokenfile.write_token_file (or fix the path)"


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest unsigned dtype that holds every id: halves the file for vocabularies <= 64K."""
  return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def write_token_file(out_dir: str, docs: Iterable[np.ndarray | Sequence[int]], vocab_size: int,
                     *, overwrite: bool = False) -> dict[str, Any]:
  """Writes `docs` as a token file at `out_dir` and returns its meta.

  Everything goes into a temp directory next to `out_dir` that is renamed into place at the
  end, so a crash or an exception never leaves something that looks like a finished file.
  An existing `out_dir` is an error unless `overwrite`.
  """
  if not 0 < vocab_size <= 2**32:
    raise UserError(f"vocab_size={vocab_size}: must be in [1, 2**32]")
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise UserError(f"{out_dir} already exists; delete it or write to another directory")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  dtype = token_dtype(vocab_size)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    offsets = array.array("q", [0])
    with open(os.path.join(tmp, "tokens.bin"), "wb") as f:
      for i, doc in enumerate(docs):
        arr = np.asarray(doc)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
          raise UserError(f"document {i}: expected a 1-D sequence of integer token ids, got "
                          f"shape {arr.shape} dtype {arr.dtype}")
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi >= vocab_size:
          raise UserError(f"document {i}: token id {lo if lo < 0 else hi} is outside "
                          f"[0, {vocab_size}); check that the tokenizer matches vocab_size")
        f.write(arr.astype(dtype, copy=False).tobytes())
        offsets.append(offsets[-1] + arr.size)
      f.flush()
      os.fsync(f.fileno())
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
    meta = {"format": FORMAT, "dtype": dtype.name, "n_docs": len(offsets) - 1,
            "n_tokens": offsets[-1], "vocab_size": vocab_size}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    _move_into_place(tmp, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta


def _move_into_place(tmp: str, out_dir: str, overwrite: bool) -> None:
  """Renames tmp to out_dir; an old out_dir is moved aside first and deleted after."""
  old = None
  if overwrite and os.path.exists(out_dir):
    old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(old, "d"))
  try:
    os.rename(tmp, out_dir)
  except OSError:
    if old is not None:  # put the old file back rather than lose it
      os.rename(os.path.join(old, "d"), out_dir)
      os.rmdir(old)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


class TokenFile:
  """Random access to the documents of a token file (a grain RandomAccessDataSource).

  The token array is memory-mapped lazily and dropped when pickled, so grain worker processes
  each map the file themselves instead of receiving a copy.
  """

  def __init__(self, path: str) -> None:
    self.path = os.path.abspath(os.path.expanduser(path))
    self.meta = _read_meta(self.path)
    self.dtype = np.dtype(self.meta["dtype"])
    self.n_tokens = int(self.meta["n_tokens"])
    self.vocab_size = int(self.meta["vocab_size"])
    n_docs = int(self.meta["n_docs"])
    size = os.path.getsize(os.path.join(self.path, "tokens.bin"))
    if size != self.n_tokens * self.dtype.itemsize:
      raise UserError(f"{self.path}/tokens.bin has {size} bytes but meta.json promises "
                      f"{self.n_tokens} {self.dtype.name} tokens "
                      f"({self.n_tokens * self.dtype.itemsize} bytes): the file is truncated "
                      f"or corrupt; {_FIX}")
    try:
      self.offsets = np.load(os.path.join(self.path, "offsets.npy"), mmap_mode="r")
    except (OSError, ValueError) as e:
      raise UserError(f"{self.path}/offsets.npy is unreadable ({e}); {_FIX}") from None
    if (self.offsets.shape != (n_docs + 1,) or int(self.offsets[0]) != 0
        or int(self.offsets[-1]) != self.n_tokens):
      raise UserError(f"{self.path}/offsets.npy does not match meta.json (n_docs={n_docs}, "
                      f"n_tokens={self.n_tokens}): the file is corrupt; {_FIX}")
    self._tokens: np.ndarray | None = None

  @property
  def tokens(self) -> np.ndarray:
    """The flat token array, memory-mapped on first use."""
    if self._tokens is None:
      if self.n_tokens == 0:
        self._tokens = np.zeros(0, self.dtype)
      else:
        self._tokens = np.memmap(os.path.join(self.path, "tokens.bin"), dtype=self.dtype,
                                 mode="r", shape=(self.n_tokens,))
    return self._tokens

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    n = len(self)
    i = int(i)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"document {i} out of range for {n} documents in {self.path}")
    start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
    return self.tokens[start:stop].astype(np.int32)

  def doc_lengths(self) -> np.ndarray:
    """Tokens per document (int64 [n_docs])."""
    return np.diff(np.asarray(self.offsets))

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state["_tokens"] = None
    state["offsets"] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self.offsets = np.load(os.path.join(self.path, "offsets.npy"), mmap_mode="r")

  def __repr__(self) -> str:
    return f"TokenFile({self.path!r}, n_docs={len(self)}, n_tokens={self.n_tokens})"


def _read_meta(path: str) -> dict[str, Any]:
  """meta.json, checked; every failure is one UserError line naming the path and the fix."""
  if not os.path.isdir(path):
    raise UserError(f"{path}: no such token-file directory; {_FIX}")
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise UserError(f"{meta_path} is missing: {path} is not a finished token file "
                    f"(an interrupted write?); {_FIX}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{meta_path} is unreadable ({e}); {_FIX}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise UserError(f"{meta_path}: format is {got!r}, expected {FORMAT!r}; {_FIX}")
  missing = [k for k in ("dtype", "n_docs", "n_tokens", "vocab_size") if k not in meta]
  if missing or meta["dtype"] not in ("uint16", "uint32"):
    raise UserError(f"{meta_path}: missing or bad keys {missing or ['dtype']}; {_FIX}")
  for k in ("tokens.bin", "offsets.npy"):
    if not os.path.isfile(os.path.join(path, k)):
      raise UserError(f"{path}/{k} is missing; {_FIX}")
  return meta
