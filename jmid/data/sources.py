"""The one interface the pipeline reads documents through: `open_source(name, spec, tokenizer)`.

Every source, whatever its format, is a grain RandomAccessDataSource of documents
{"tokens": int32 [n], "mask": int32 [n]} that end with the tokenizer's EOS (mask 1 = trained on
as a target: all ones for text, the chat mask for chat). Formats:
  tokens       jmid token-file dirs (prepare's output); chat needs files prepared --kind=chat
  npy / bin    OLMo-style flat token arrays, documents ended by eos_id (.npy with a header;
               .bin raw in spec.dtype); document offsets come from one scan at open
  arrayrecord  one record per document: the little-endian bytes of int32 ids (write_arrayrecord)
  jsonl        one JSON object per line, tokenized on the fly
  parquet      a string (or messages) column, tokenized on the fly
Sources hold only paths and offsets when pickled; files are (re)opened lazily in each process.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jmid.config import FORMATS, SourceConfig
from jmid.errors import UserError
from jmid.data import formats
from jmid.data.tokenfile import TokenFile
from jmid.data.tokenizer import Tokenizer

SCAN_CHUNK = 1 << 24  # tokens per step when scanning npy/bin files for EOS
_NPY_MAGIC = b"\x93NUMPY"


class DocSource:
  """Documents of one source; subclasses implement _get(i) -> (tokens, mask) and the rest."""

  append_eos = True  # end every document with EOS if the stored form does not

  def __init__(self, key: str, tok: Tokenizer, kind: str) -> None:
    self.key, self.tok, self.kind = key, tok, kind  # key: "data.sources.<name>.path"
    self.eos_id = int(tok.eos_id)

  def __len__(self) -> int:
    raise NotImplementedError

  def _get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _index(self, i: int) -> int:
    n, i = len(self), int(i)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"document {i} out of range for {n} documents ({self.key})")
    return i

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    tokens, mask = self._get(self._index(i))
    if self.append_eos and (not len(tokens) or tokens[-1] != self.eos_id):
      tokens = np.append(tokens, np.int32(self.eos_id))
      mask = np.append(mask, np.int32(self.kind == "text"))
    return {"tokens": tokens.astype(np.int32, copy=False),
            "mask": mask.astype(np.int32, copy=False)}

  def num_bytes(self, i: int) -> int:
    """UTF-8 bytes of document i's text (specials excluded), for bits per byte."""
    tokens = self[i]["tokens"]
    return len(self.tok.decode(tokens, skip_special=True).encode("utf-8"))

  def max_token_id(self) -> int:
    """The largest id any document can hold (for the model.vocab_size check)."""
    return self.tok.vocab_size - 1

  def _check_ids(self, tokens: np.ndarray, where: str, fix: str = "") -> np.ndarray:
    lo, hi = (int(tokens.min()), int(tokens.max())) if len(tokens) else (0, 0)
    if lo < 0 or hi >= self.tok.vocab_size:
      raise UserError(f"{self.key}: {where} holds token id {lo if lo < 0 else hi}, outside the "
                      f"tokenizer's {self.tok.vocab_size} ids; {fix or 'set data.tokenizer'} "
                      "to the tokenizer it was made with")
    return tokens

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.key}, n_docs={len(self)})"


class _MultiFile(DocSource):
  """Helper for sources made of several files: global index -> (file, local index)."""

  def _set_counts(self, counts: list[int]) -> None:
    self._starts = np.cumsum([0] + counts).astype(np.int64)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _locate(self, i: int) -> tuple[int, int]:
    f = int(np.searchsorted(self._starts, i, side="right")) - 1
    return f, i - int(self._starts[f])


class TokenFileSource(_MultiFile):
  """jmid token-file dirs (a glob of several is one source).

  Documents are served as stored: prepare and the demo corpus write EOS themselves, and a
  hand-written file (write_token_file) is taken at its word. Files from prepare record their
  tokenizer's EOS id, which is checked against data.tokenizer together with the id range.
  """

  append_eos = False

  def __init__(self, key: str, paths: list[str], tok: Tokenizer, kind: str) -> None:
    super().__init__(key, tok, kind)
    self.files = []
    for p in paths:
      try:
        tf = TokenFile(p)
      except UserError as e:
        raise UserError(f"{key}: {e}") from None
      eos = tf.meta.get("eos_id")
      if eos is not None and int(eos) != self.eos_id:
        raise UserError(f"{key}: {p} was prepared with EOS id {eos} (tokenizer "
                        f"{tf.meta.get('tokenizer', '?')}) but data.tokenizer's EOS is "
                        f"{self.eos_id}; set data.tokenizer to the one it was prepared with")
      if eos is not None and tf.max_token_id() >= tok.vocab_size:
        raise UserError(f"{key}: {p} holds token id {tf.max_token_id()} but data.tokenizer has "
                        f"{tok.vocab_size} ids; set data.tokenizer to the one it was prepared with")
      if kind == "chat" and not tf.has_mask:
        raise UserError(f"{key}: {p} has no loss mask, so kind='chat' cannot tell prompts from "
                        "answers; prepare it with --kind=chat or set kind='text'")
      if kind == "text" and tf.has_mask:
        raise UserError(f"{key}: {p} was prepared as chat (it has a loss mask); set "
                        f"{key.removesuffix('.path')}.kind='chat'")
      self.files.append(tf)
    self._set_counts([len(tf) for tf in self.files])

  def _get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    f, j = self._locate(i)
    tokens = self.files[f][j]
    mask = self.files[f].mask(j) if self.kind == "chat" else None
    return tokens, np.ones(len(tokens), np.int32) if mask is None else mask

  def max_token_id(self) -> int:
    return max(tf.max_token_id() for tf in self.files)

  def doc_lengths(self, indices: np.ndarray) -> np.ndarray:
    """Tokens of each document in `indices`, from the offsets alone (no token is read)."""
    idx = np.asarray(indices, np.int64)
    which = np.searchsorted(self._starts, idx, side="right") - 1
    out = np.zeros(len(idx), np.int64)
    for f, tf in enumerate(self.files):
      sel = which == f
      if sel.any():
        out[sel] = tf.doc_lengths(idx[sel] - self._starts[f])
    return out


class FlatSource(_MultiFile):
  """OLMo-style flat token arrays (.npy or raw .bin); documents end with eos_id."""

  def __init__(self, key: str, paths: list[str], tok: Tokenizer, kind: str, fmt: str,
               dtype: str, eos_id: int) -> None:
    super().__init__(key, tok, kind)
    self.eos_id = int(tok.eos_id if eos_id < 0 else eos_id)
    self.paths, self.fmt, self.dtype = paths, fmt, np.dtype(dtype)
    self.offsets: list[np.ndarray] = []
    self._max = -1
    self._arrays: list[np.ndarray | None] = [None] * len(paths)
    for f, p in enumerate(paths):
      arr = self._array(f)
      if arr.size and not (np.iinfo(arr.dtype).min <= self.eos_id <= np.iinfo(arr.dtype).max):
        raise UserError(f"{key}: EOS id {self.eos_id} does not fit {p}'s dtype {arr.dtype}; "
                        f"fix {key.removesuffix('.path')}.dtype or .eos_id")
      self.offsets.append(self._scan(arr, p))
    self._set_counts([len(o) - 1 for o in self.offsets])

  def _array(self, f: int) -> np.ndarray:
    if self._arrays[f] is None:
      self._arrays[f] = self._open(self.paths[f])
    return self._arrays[f]  # type: ignore[return-value]

  def _open(self, p: str) -> np.ndarray:
    fix = f"{self.key.removesuffix('.path')}"
    if self.fmt == "npy":
      with open(p, "rb") as fh:
        if fh.read(6) != _NPY_MAGIC:
          raise UserError(f"{self.key}: {p} has no .npy header (OLMo/Dolma write raw arrays "
                          f"named .npy); set {fix}.format='bin' and {fix}.dtype")
      try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError) as e:
        raise UserError(f"{self.key}: {p} is not a readable .npy file ({e})") from None
      if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise UserError(f"{self.key}: {p} holds a {arr.dtype} array of shape {arr.shape}; "
                        "expected a 1-D integer token array")
      return arr
    size = os.path.getsize(p)
    if size % self.dtype.itemsize:
      raise UserError(f"{self.key}: {p} has {size} bytes, not a whole number of "
                      f"{self.dtype.name} tokens; fix {fix}.dtype")
    if size == 0:
      return np.zeros(0, self.dtype)
    return np.memmap(p, dtype=self.dtype, mode="r")

  def _scan(self, arr: np.ndarray, p: str) -> np.ndarray:
    """Document offsets [n_docs + 1] of one file (each EOS ends a document; a tail without one
    is a document too), checking the id range on the way."""
    ends = []
    head = np.asarray(arr[:4096])
    if self.fmt == "bin" and arr.dtype.itemsize == 2 and head.size >= 64 and not head[1::2].any():
      raise UserError(f"{self.key}: every other uint16 in {p} is 0: it looks like 32-bit tokens; "
                      f"set {self.key.removesuffix('.path')}.dtype='uint32'")
    for lo in range(0, arr.size, SCAN_CHUNK):
      chunk = np.asarray(arr[lo:lo + SCAN_CHUNK])
      ends.append(np.flatnonzero(chunk == self.eos_id) + lo + 1)
      if int(chunk.min()) < 0 or int(chunk.max()) >= self.tok.vocab_size:
        self._check_ids(chunk, p, f"check {self.key.removesuffix('.path')}.dtype, or set "
                        "data.tokenizer")
      self._max = max(self._max, int(chunk.max()))
    e = np.concatenate(ends + [np.zeros(0, np.int64)]).astype(np.int64)
    if arr.size and (not len(e) or e[-1] != arr.size):
      e = np.append(e, arr.size)
    return np.concatenate([[0], e]).astype(np.int64)

  def _get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    f, j = self._locate(i)
    o = self.offsets[f]
    tokens = np.asarray(self._array(f)[o[j]:o[j + 1]]).astype(np.int32)
    return tokens, np.ones(len(tokens), np.int32)

  def max_token_id(self) -> int:
    return self._max

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_arrays": [None] * len(self.paths)}


class ArrayRecordSource(DocSource):
  """ArrayRecord files whose records are little-endian int32 token arrays."""

  def __init__(self, key: str, paths: list[str], tok: Tokenizer, kind: str) -> None:
    super().__init__(key, tok, kind)
    self.paths = paths
    self._ds: Any = None
    self._n = len(self._reader())

  def _reader(self) -> Any:
    if self._ds is None:
      import grain
      try:
        self._ds = grain.sources.ArrayRecordDataSource(self.paths)
      except RuntimeError as e:
        raise UserError(f"{self.key}: not readable as ArrayRecord ({e})") from None
    return self._ds

  def __len__(self) -> int:
    return self._n

  def _get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = formats.decode_record(self._reader()[i], f"{self.key} record {i}")
    self._check_ids(tokens, f"record {i}")
    return tokens, np.ones(len(tokens), np.int32)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_ds": None}


class TextSource(_MultiFile):
  """JSONL or Parquet records tokenized on the fly in __getitem__."""

  def __init__(self, key: str, paths: list[str], tok: Tokenizer, kind: str, fmt: str,
               field: str) -> None:
    super().__init__(key, tok, kind)
    self.fmt, self.field = fmt, formats.default_field(kind, field)
    cache = formats.RowGroupCache()
    self.files: list[Any] = [
        formats.JsonlFile(p) if fmt == "jsonl" else
        formats.ParquetColumn(p, self.field, kind, cache) for p in paths]
    self._set_counts([len(f) for f in self.files])
    for f in self.files:  # a wrong field shows up now, not hours into training
      if len(f):
        self._value(f, 0)

  def _value(self, f: Any, j: int) -> Any:
    if self.fmt == "jsonl":
      try:
        return formats.parse_json_line(f.raw(j), self.field, self.kind, f"{f.path}")
      except UserError:  # re-run with the line number, which costs a read of the file
        return formats.parse_json_line(f.raw(j), self.field, self.kind, f.where(j))
    return formats.check_value(f.value(j), self.field, self.kind, f.where(j))

  def _get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    f, j = self._locate(i)
    value = self._value(self.files[f], j)
    return formats.tokenize_value(value, self.kind, self.tok, self.key)

  def num_bytes(self, i: int) -> int:
    if self.kind == "chat":
      return super().num_bytes(i)
    f, j = self._locate(self._index(i))
    return len(self._value(self.files[f], j).encode("utf-8"))


def open_source(name: str, spec: SourceConfig, tokenizer: Tokenizer, *,
                eval: bool = False) -> DocSource:
  """Opens spec.path (spec.eval_path when eval) in spec.format; errors name the config key."""
  base = f"data.sources.{name}"
  key = f"{base}.{'eval_path' if eval else 'path'}"
  pattern = spec.eval_path if eval else spec.path
  if spec.format not in FORMATS:
    raise UserError(f"{base}.format={spec.format!r}: unknown; choose one of {', '.join(FORMATS)}")
  if spec.kind not in ("text", "chat"):
    raise UserError(f"{base}.kind={spec.kind!r}: unknown; choose text or chat")
  if spec.kind == "chat" and spec.format in ("npy", "bin", "arrayrecord"):
    raise UserError(f"{base}: kind='chat' needs a loss mask, which {spec.format} files cannot "
                    "hold; use jsonl/parquet, or tokens prepared with --kind=chat")
  if not pattern:
    raise UserError(f"{key} is empty: set it to a file, directory or glob")
  paths = formats.resolve_paths(key, pattern)
  if spec.format == "tokens":
    src: DocSource = TokenFileSource(key, paths, tokenizer, spec.kind)
  else:
    paths = formats.expand_dirs(key, spec.format, paths)
    if spec.format in ("npy", "bin"):
      if spec.dtype not in ("uint16", "uint32", "int32"):
        raise UserError(f"{base}.dtype={spec.dtype!r}: choose uint16, uint32 or int32")
      src = FlatSource(key, paths, tokenizer, spec.kind, spec.format, spec.dtype, spec.eos_id)
    elif spec.format == "arrayrecord":
      src = ArrayRecordSource(key, paths, tokenizer, spec.kind)
    else:
      src = TextSource(key, paths, tokenizer, spec.kind, spec.format, spec.field)
  if len(src) == 0:
    raise UserError(f"{key}={pattern!r}: no documents in {len(paths)} file(s); prepare it again "
                    "or remove the source")
  return src
