"""jmid's token-file format: a directory a training run can memory-map without parsing.

Layout of `<dir>/`:
  tokens.bin   every document's tokens back to back (uint16 if vocab_size <= 65536, else uint32)
  offsets.npy  int64 [n_docs + 1]; document i is tokens[offsets[i]:offsets[i + 1]]
  mask.bin     optional uint8 [n_tokens], 1 = the token is trained on as a target (chat data:
               prompts are 0); present exactly when meta has "has_mask": true
  meta.json    {"format": "jmid-tokens-v1", "dtype", "n_docs", "n_tokens", "vocab_size",
                "has_mask", "max_token_id", ...extra keys such as "eos_id", "tokenizer"}

Files written before mask.bin existed (no "has_mask", no "max_token_id") still load.

meta.json is written last and the directory appears by one rename, so a directory with a
meta.json is complete: an interrupted write leaves only a `*.tmp-*` sibling behind. Opening
checks what is cheap to check (sizes, offsets rising from 0 to n_tokens, the ids at both ends
of tokens.bin), so a damaged or foreign file is one error naming it, not garbage batches.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jmid.data import atomic
from jmid.errors import UserError

FORMAT = "jmid-tokens-v1"
_FIX = ("rebuild it with python -m jmid.data.prepare (or jmid.data.tokenfile.write_token_file), "
        "or fix the path")
INVALID = "is not a valid jmid token file"
SAMPLE = 1 << 20  # tokens read from each end of tokens.bin at open to catch garbage
OFFSETS_CHUNK = 1 << 22  # offsets checked per step (monotone) at open


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest unsigned dtype that holds every id: halves the file for vocabularies <= 64K."""
  return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


Doc = np.ndarray | Sequence[int]


def write_token_file(out_dir: str, docs: Iterable[Doc] | Iterable[tuple[Doc, Doc]],
                     vocab_size: int, *, overwrite: bool = False,
                     extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes `docs` as a token file at `out_dir` and returns its meta.

  A document is a 1-D sequence of ids, or a (tokens, mask) tuple (mask: 0/1 per token, 1 =
  trained on) to write mask.bin as well: pairs rather than a second iterable, so one generator
  streams both; either every document is a pair or none is. `extra_meta` keys (e.g. "eos_id",
  "tokenizer") go into meta.json too.
  Everything goes into a temp directory next to `out_dir` that is renamed into place at the
  end, so a crash or an exception never leaves something that looks like a finished file.
  An existing `out_dir` is an error unless `overwrite`.
  """
  if not 0 < vocab_size <= 2**32:
    raise UserError(f"vocab_size={vocab_size}: must be in [1, 2**32]")
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise UserError(f"{out_dir} already exists; delete it or write to another directory")
  dtype = token_dtype(vocab_size)
  with atomic.temp_sibling(out_dir) as tmp:
    offsets = array.array("q", [0])
    max_id = -1
    masked: bool | None = None  # decided by the first document
    with contextlib.ExitStack() as stack:
      f = stack.enter_context(open(os.path.join(tmp, "tokens.bin"), "wb"))
      fm = None
      for i, doc in enumerate(docs):
        pair = _is_pair(doc)
        if masked is None:
          masked = pair
          if pair:
            fm = stack.enter_context(open(os.path.join(tmp, "mask.bin"), "wb"))
        if pair != masked:
          raise UserError(f"document {i}: {'a' if pair else 'no'} (tokens, mask) pair, but "
                          f"document 0 was {'not ' if pair else ''}one; masks go with every "
                          "document or with none")
        tokens, mask = doc if pair else (doc, None)  # type: ignore[misc]
        arr, hi = _check_doc(i, tokens, vocab_size)
        if fm is not None:
          fm.write(_check_mask(i, mask, arr.size).tobytes())
        max_id = max(max_id, hi)
        f.write(arr.astype(dtype, copy=False).tobytes())
        offsets.append(offsets[-1] + arr.size)
      for g in (f, fm):
        if g is not None:
          g.flush()
          os.fsync(g.fileno())
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
    meta = dict(extra_meta or {})
    meta.update({"format": FORMAT, "dtype": dtype.name, "n_docs": len(offsets) - 1,
                 "n_tokens": offsets[-1], "vocab_size": vocab_size, "has_mask": bool(masked),
                 "max_token_id": max_id})
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    _move_into_place(tmp, out_dir, overwrite)
  return meta


def _is_pair(doc: Any) -> bool:
  """A (tokens, mask) tuple, as opposed to a tuple of ids."""
  return isinstance(doc, tuple) and len(doc) == 2 and not np.isscalar(doc[0])


def _check_doc(i: int, doc: Doc, vocab_size: int) -> tuple[np.ndarray, int]:
  """The document as an array and its largest id (-1 if empty); bad ids are a UserError."""
  arr = np.asarray(doc)
  if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
    raise UserError(f"document {i}: expected a 1-D sequence of integer token ids, got "
                    f"shape {arr.shape} dtype {arr.dtype}")
  lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, -1)
  if lo < 0 or hi >= vocab_size:
    raise UserError(f"document {i}: token id {lo if lo < 0 else hi} is outside "
                    f"[0, {vocab_size}); check that the tokenizer matches vocab_size")
  return arr, hi


def _check_mask(i: int, mask: Doc, n: int) -> np.ndarray:
  m = np.asarray(mask)
  if m.shape != (n,) or (m.size and (m.dtype.kind not in "iub" or int(m.min()) < 0
                                     or int(m.max()) > 1)):
    raise UserError(f"document {i}: the mask must be {n} values of 0 or 1 (one per token), got "
                    f"shape {m.shape} dtype {m.dtype}")
  return m.astype(np.uint8)


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
    self.has_mask = bool(self.meta.get("has_mask", False))
    n_docs = int(self.meta["n_docs"])
    tpath = os.path.join(self.path, "tokens.bin")
    size = os.path.getsize(tpath)
    if size != self.n_tokens * self.dtype.itemsize:
      raise _invalid(tpath, f"{size} bytes, but meta.json promises {self.n_tokens} "
                     f"{self.dtype.name} tokens ({self.n_tokens * self.dtype.itemsize} bytes): "
                     "truncated or corrupt")
    opath = os.path.join(self.path, "offsets.npy")
    with open(opath, "rb") as f:
      if f.read(6) != b"\x93NUMPY":
        raise _invalid(opath, "no .npy header")
    try:
      self.offsets = np.load(opath, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise _invalid(opath, f"unreadable as .npy: {str(e)[:120]}") from None
    _check_offsets(opath, self.offsets, n_docs, self.n_tokens)
    if self.has_mask:
      mpath = os.path.join(self.path, "mask.bin")
      msize = os.path.getsize(mpath) if os.path.isfile(mpath) else -1
      if msize != self.n_tokens:
        raise UserError(f"{mpath} is {'missing' if msize < 0 else f'{msize} bytes'} but "
                        f"meta.json promises a mask of {self.n_tokens} tokens: {self.path} "
                        f"{INVALID}; {_FIX}")
    self._tokens: np.ndarray | None = None
    self._mask: np.ndarray | None = None
    self._check_sample()

  def _check_sample(self) -> None:
    """Garbage in tokens.bin / mask.bin shows as ids above the recorded maximum (or the vocab)
    and mask values other than 0/1: checks the first and last SAMPLE tokens, a cheap read."""
    n = self.n_tokens
    spans = [(0, min(n, SAMPLE))] + ([(max(n - SAMPLE, SAMPLE), n)] if n > SAMPLE else [])
    top = min(int(self.meta.get("max_token_id", self.vocab_size - 1)), self.vocab_size - 1)
    for lo, hi in spans:
      if hi > lo and int(np.max(self.tokens[lo:hi])) > top:
        bad = lo + int(np.argmax(np.asarray(self.tokens[lo:hi]) > top))
        raise _invalid(os.path.join(self.path, "tokens.bin"),
                       f"token {bad} is id {int(self.tokens[bad])}, above the largest id "
                       f"{top} meta.json records (vocab_size {self.vocab_size})")
      if self.has_mask and hi > lo and int(np.max(self._mask_array()[lo:hi])) > 1:
        raise _invalid(os.path.join(self.path, "mask.bin"), "mask values other than 0 and 1")

  def _mask_array(self) -> np.ndarray:
    if self._mask is None:
      self._mask = (np.zeros(0, np.uint8) if self.n_tokens == 0 else
                    np.memmap(os.path.join(self.path, "mask.bin"), dtype=np.uint8, mode="r",
                              shape=(self.n_tokens,)))
    return self._mask

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

  def _span(self, i: int) -> tuple[int, int]:
    n = len(self)
    i = int(i)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"document {i} out of range for {n} documents in {self.path}")
    return int(self.offsets[i]), int(self.offsets[i + 1])

  def __getitem__(self, i: int) -> np.ndarray:
    start, stop = self._span(i)
    return np.array(self.tokens[start:stop], dtype=np.int32)  # a plain array, not a memmap

  def mask(self, i: int) -> np.ndarray | None:
    """Document i's loss mask (int32 0/1), or None when the file has no mask.bin."""
    if not self.has_mask:
      return None
    start, stop = self._span(i)
    return np.array(self._mask_array()[start:stop], dtype=np.int32)

  def max_token_id(self) -> int:
    """The largest id in the file (-1 if empty): from meta.json, else one pass over tokens."""
    if "max_token_id" not in self.meta:
      self.meta["max_token_id"] = int(self.tokens.max()) if self.n_tokens else -1
    return int(self.meta["max_token_id"])

  def doc_lengths(self, indices: np.ndarray | None = None) -> np.ndarray:
    """Tokens per document (int64 [n_docs]), or per document of `indices`."""
    if indices is None:
      return np.diff(np.asarray(self.offsets))
    indices = np.asarray(indices, np.int64)
    return np.asarray(self.offsets[indices + 1]) - np.asarray(self.offsets[indices])

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state["_tokens"] = None
    state["_mask"] = None
    state["offsets"] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self.offsets = np.load(os.path.join(self.path, "offsets.npy"), mmap_mode="r")

  def __repr__(self) -> str:
    return f"TokenFile({self.path!r}, n_docs={len(self)}, n_tokens={self.n_tokens})"


def _invalid(path: str, detail: str) -> UserError:
  """`<dir>/<file>: <detail>, so <dir> is not a valid jmid token file; <fix>`."""
  return UserError(f"{path}: {detail}, so {os.path.dirname(path)} {INVALID}; {_FIX}")


def _check_offsets(path: str, offsets: np.ndarray, n_docs: int, n_tokens: int) -> None:
  """Offsets are n_docs + 1 integers rising from 0 to n_tokens (one pass, in chunks)."""
  if offsets.dtype.kind not in "iu" or offsets.shape != (n_docs + 1,):
    raise _invalid(path, f"{offsets.dtype} array of shape {offsets.shape}, meta.json promises "
                   f"int64 [{n_docs + 1}] (n_docs + 1)")
  if int(offsets[0]) != 0 or int(offsets[-1]) != n_tokens:
    raise _invalid(path, f"runs from {int(offsets[0])} to {int(offsets[-1])}, meta.json "
                   f"promises 0 to n_tokens={n_tokens}")
  for lo in range(0, n_docs, OFFSETS_CHUNK):
    step = np.diff(np.asarray(offsets[lo:lo + OFFSETS_CHUNK + 1], dtype=np.int64))
    if (step < 0).any():
      doc = lo + int(np.argmax(step < 0))
      raise _invalid(path, f"document {doc} ends before it starts: offsets must not decrease")


def _read_meta(path: str) -> dict[str, Any]:
  """meta.json, checked; every failure is one UserError line naming the path and the fix."""
  if not os.path.isdir(path):
    raise UserError(f"{path}: no such token-file directory; {_FIX}")
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise UserError(f"{meta_path} is missing: {path} is not a finished token file "
                    f"(an interrupted write?); {_FIX}")
  try:
    with open(meta_path, "rb") as f:
      meta = json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError) as e:
    raise _invalid(meta_path, f"unreadable as JSON: {str(e)[:120]}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise _invalid(meta_path, f"format is {got!r}, expected {FORMAT!r}")
  missing = [k for k in ("dtype", "n_docs", "n_tokens", "vocab_size") if k not in meta]
  lowest = {"n_docs": 0, "n_tokens": 0, "vocab_size": 1, "max_token_id": -1}
  bad = [k for k, lo in lowest.items() if k in meta and not (
      isinstance(meta[k], int) and not isinstance(meta[k], bool) and meta[k] >= lo)]
  if missing or bad or meta["dtype"] not in ("uint16", "uint32"):
    what = "missing keys " + ", ".join(missing) if missing else \
        f"bad values {', '.join(f'{k}={meta[k]!r}' for k in bad or ['dtype'])}"
    raise _invalid(meta_path, what)
  for k in ("tokens.bin", "offsets.npy"):
    if not os.path.isfile(os.path.join(path, k)):
      raise UserError(f"{path}/{k} is missing; {_FIX}")
  return meta
