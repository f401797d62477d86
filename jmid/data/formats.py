"""Reading text records (JSONL, Parquet, plain text) and ArrayRecord token records: the pieces
shared by on-the-fly sources (random access) and the prepare CLI (streaming).

A record is a JSON object / Parquet row whose `field` holds a string (kind 'text') or a list of
{role, content} messages (kind 'chat'). Every failure names the file and the line or row.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jmid.errors import UserError
from jmid.data.chat import render_chat, validate_messages
from jmid.data.tokenizer import Tokenizer

INDEX_CHUNK = 1 << 24  # bytes read at a time when indexing lines
PARQUET_CACHE_BYTES = 1 << 30  # decoded row groups kept per source (LRU)


def default_field(kind: str, field: str) -> str:
  return field or ("messages" if kind == "chat" else "text")


def check_value(value: Any, field: str, kind: str, where: str) -> Any:
  """The field's value, checked: a string for text, a message list for chat."""
  if kind == "chat":
    return validate_messages(value, f"{where}: field {field!r}")
  if not isinstance(value, str):
    got = "null" if value is None else type(value).__name__
    raise UserError(f"{where}: field {field!r} is {got}, expected a string; fix the record or "
                    "set the field/kind of the source")
  return value


def extract(record: Any, field: str, kind: str, where: str) -> Any:
  """record[field] of a parsed JSON record, checked."""
  if not isinstance(record, dict):
    raise UserError(f"{where}: the record is a JSON {type(record).__name__}, expected an object "
                    f"with a {field!r} field")
  if field not in record:
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise UserError(f"{where}: no field {field!r} (fields: {keys}); set the source's field "
                    "(--field for prepare) to the one holding the "
                    f"{'messages' if kind == 'chat' else 'text'}")
  return check_value(record[field], field, kind, where)


def parse_json_line(raw: bytes, field: str, kind: str, where: str) -> Any:
  try:
    record = json.loads(raw)
  except ValueError as e:
    raise UserError(f"{where}: not valid JSON ({e}); every line must be one JSON object") from None
  return extract(record, field, kind, where)


def tokenize_value(value: Any, kind: str, tok: Tokenizer,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask) int32 of a checked value; text gets EOS appended and an all-ones mask."""
  if kind == "chat":
    return render_chat(value, tok, where=where)
  tokens = np.append(tok.encode(value), np.int32(tok.eos_id)).astype(np.int32)
  return tokens, np.ones(len(tokens), np.int32)


def text_bytes(value: Any, kind: str, tokens: np.ndarray, tok: Tokenizer) -> int:
  """UTF-8 bytes of a document's text: exact for text; for chat, the text of its non-special
  tokens (the same count a token file of it reports)."""
  if kind == "chat":
    return len(tok.decode(tokens, skip_special=True).encode("utf-8"))
  return len(value.encode("utf-8"))


# Paths -----------------------------------------------------------------------------------------

def resolve_paths(key: str, pattern: str) -> list[str]:
  """A file, a directory or a glob -> sorted existing paths; nothing matching is a UserError."""
  path = os.path.abspath(os.path.expanduser(pattern))
  paths = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else (
      [path] if os.path.exists(path) else [])
  if not paths:
    raise UserError(f"{key}={pattern!r}: no file matches; check the path (relative paths are "
                    f"resolved from {os.getcwd()})")
  return paths


def expand_dirs(key: str, fmt: str, paths: list[str]) -> list[str]:
  """A plain directory given for a file format means every file of that format inside it."""
  suffix = {"npy": ".npy", "bin": ".bin", "arrayrecord": ".arrayrecord", "jsonl": ".jsonl",
            "parquet": ".parquet"}[fmt]
  out = []
  for p in paths:
    if os.path.isdir(p):
      inner = sorted(glob.glob(os.path.join(p, "**", "*" + suffix), recursive=True))
      if not inner:
        raise UserError(f"{key}: directory {p} holds no *{suffix} file; point the path at "
                        "the files or fix the format")
      out.extend(inner)
    else:
      out.append(p)
  return out


# JSONL -----------------------------------------------------------------------------------------

class JsonlFile:
  """Byte offsets of the non-empty lines of a JSONL file; lines are read lazily with pread
  (thread-safe, and only the offsets are pickled)."""

  def __init__(self, path: str) -> None:
    self.path = path
    if path.endswith((".gz", ".zst", ".bz2", ".xz")):
      raise UserError(f"{path}: compressed JSONL cannot be read at random; decompress it or "
                      "tokenize it with python -m jmid.data.prepare")
    newlines = []
    with open(path, "rb") as f:
      base = 0
      while chunk := f.read(INDEX_CHUNK):
        newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + base)
        base += len(chunk)
    ends = np.concatenate(newlines + [np.zeros(0, np.int64)]).astype(np.int64)
    if base and (not len(ends) or ends[-1] != base - 1):
      ends = np.append(ends, base)  # a last line without "\n"
    begins = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends
    keep = ends - begins >= 2  # blank lines ("", "\r") are skipped; a record needs "{}"
    self.starts, self.stops = begins[keep], ends[keep]
    self._fd: int | None = None

  def __len__(self) -> int:
    return len(self.starts)

  def raw(self, j: int) -> bytes:
    if self._fd is None:  # two threads may both open; the loser closes its own fd
      fd = os.open(self.path, os.O_RDONLY)
      if self._fd is None:
        self._fd = fd
      else:
        os.close(fd)
    start = int(self.starts[j])
    return os.pread(self._fd, int(self.stops[j]) - start, start)

  def where(self, j: int) -> str:
    """'path:line' (1-based, counting blank lines too)."""
    n, left = 0, int(self.starts[j])
    with open(self.path, "rb") as f:
      while left > 0:
        chunk = f.read(min(left, INDEX_CHUNK))
        n += chunk.count(b"\n")
        left -= len(chunk)
    return f"{self.path}:{n + 1}"

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_fd": None}

  def __del__(self, _close: Any = os.close) -> None:  # os may be gone at interpreter exit
    if getattr(self, "_fd", None) is not None:
      _close(self._fd)


def iter_jsonl(path: str) -> Iterator[tuple[int, bytes]]:
  """(line number, raw line) of the non-empty lines; .gz files are read through gzip."""
  with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        yield n, line


# Parquet ---------------------------------------------------------------------------------------

class RowGroupCache:
  """An LRU of decoded Parquet column chunks under a byte budget, shared by a source's files."""

  def __init__(self, max_bytes: int = PARQUET_CACHE_BYTES) -> None:
    self.max_bytes = max_bytes
    self._items: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
    self._bytes = 0
    self.lock = threading.Lock()

  def get(self, key: tuple[str, int], load: Any) -> Any:
    with self.lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
      value = load()
      self._items[key] = value
      self._bytes += value.nbytes
      while self._bytes > self.max_bytes and len(self._items) > 1:
        _, old = self._items.popitem(last=False)
        self._bytes -= old.nbytes
      return value

  def __getstate__(self) -> dict[str, Any]:
    return {"max_bytes": self.max_bytes}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["max_bytes"])  # type: ignore[misc]


def _parquet_file(path: str) -> Any:
  import pyarrow.parquet as pq
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a corrupt file
    raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def check_parquet_field(path: str, pf: Any, field: str, kind: str) -> None:
  """The column exists and has the type the kind needs (string / list of structs)."""
  import pyarrow as pa
  schema = pf.schema_arrow
  if field not in schema.names:
    raise UserError(f"{path}: no column {field!r} (columns: {', '.join(schema.names[:8])}); set "
                    "the source's field (--field for prepare)")
  t = schema.field(field).type
  ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) if kind == "chat" else (
      pa.types.is_string(t) or pa.types.is_large_string(t)
      or getattr(pa.types, "is_string_view", lambda _: False)(t))
  if not ok:
    want = "a list of {role, content} structs" if kind == "chat" else "a string column"
    raise UserError(f"{path}: column {field!r} has type {t}, but kind {kind!r} needs {want}")


class ParquetColumn:
  """Random access to one column of a Parquet file, a row group at a time through a cache."""

  def __init__(self, path: str, field: str, kind: str, cache: RowGroupCache) -> None:
    self.path, self.field, self.cache = path, field, cache
    pf = _parquet_file(path)
    check_parquet_field(path, pf, field, kind)
    rows = [pf.metadata.row_group(k).num_rows for k in range(pf.metadata.num_row_groups)]
    self.starts = np.cumsum([0] + rows).astype(np.int64)
    self._pf: Any = pf

  def __len__(self) -> int:
    return int(self.starts[-1])

  def value(self, j: int) -> Any:
    k = int(np.searchsorted(self.starts, j, side="right")) - 1

    def load() -> Any:
      if self._pf is None:
        self._pf = _parquet_file(self.path)
      return self._pf.read_row_group(k, columns=[self.field]).column(0).combine_chunks()

    return self.cache.get((self.path, k), load)[j - int(self.starts[k])].as_py()

  def where(self, j: int) -> str:
    return f"{self.path} row {j}"

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_pf": None}


def iter_parquet(path: str, field: str, kind: str, batch_rows: int = 1024) -> Iterator[list[Any]]:
  """The column's values, a record batch at a time (values are checked by the caller)."""
  pf = _parquet_file(path)
  check_parquet_field(path, pf, field, kind)
  for batch in pf.iter_batches(batch_size=batch_rows, columns=[field]):
    yield batch.column(0).to_pylist()


# ArrayRecord -----------------------------------------------------------------------------------

def write_arrayrecord(path: str, docs: Sequence[np.ndarray | Sequence[int]]) -> int:
  """Writes each document as one record: the little-endian bytes of its int32 token ids.

  group_size:1 keeps every record separately addressable, so random reads stay cheap.
  Returns the number of records.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = f"{path}.tmp-{os.getpid()}"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  try:
    n = 0
    for doc in docs:
      writer.write(np.asarray(doc, dtype="<i4").tobytes())
      n += 1
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return n


def decode_record(record: bytes, where: str) -> np.ndarray:
  if len(record) % 4:
    raise UserError(f"{where}: a record of {len(record)} bytes is not an int32 token array; "
                    "write records with jmid.data.formats.write_arrayrecord")
  return np.frombuffer(record, dtype="<i4").astype(np.int32)
