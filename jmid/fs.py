"""Paths that are local or in object storage (gs://): the one place that knows the difference.

Local paths go through os, as always: writes go to a temporary name and are renamed, so a crash
never leaves a torn file. gs:// goes through etils epath (gcsfs underneath; the `gcs` extra):
there one object write is atomic by itself, a rename is a copy and a delete, and an object
cannot be appended to, so writes go straight to the final name and an append rewrites the
object. Orbax and TensorStore read and write gs:// checkpoints themselves. s3:// is refused in
one line: Orbax 0.12 maps only gs:// to a TensorStore driver (its s3 saves fail).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from jmid.errors import UserError

REMOTE = ("gs://",)
UNSUPPORTED = ("s3://",)


def is_remote(path: str) -> bool:
  return path.startswith(REMOTE)


def check_scheme(path: str, what: str = "path") -> None:
  """s3:// is one line (see the module docstring); local and gs:// paths pass."""
  if path.startswith(UNSUPPORTED):
    raise UserError(f"{what}={path}: s3:// is not supported (Orbax checkpoints reach object "
                    "storage only through gs://); use a gs:// bucket or mount the bucket "
                    "(e.g. mountpoint-s3) and give the local path")


def absolute(path: str, what: str = "path") -> str:
  """A local path made absolute (~ expanded); a gs:// path as it is; s3:// refused."""
  check_scheme(path, what)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def _p(path: str) -> Any:
  from etils import epath
  return epath.Path(path)


def exists(path: str) -> bool:
  return _p(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _p(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Entry names; [] for a missing folder in object storage (folders exist only by prefix)."""
  if is_remote(path):
    return sorted(p.name for p in _p(path).iterdir()) if isdir(path) else []
  return os.listdir(path)


def makedirs(path: str) -> None:
  """Local: the folder and its parents; object storage needs none (a prefix is a folder)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
  if is_remote(path):
    return _p(path).read_text()
  with open(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Replaces the file whole or not at all: locally through a temporary name and a rename."""
  write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
  """Replaces the file whole or not at all, as write_text."""
  if is_remote(path):
    _p(path).write_bytes(data)
    return
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def append_text(path: str, text: str) -> None:
  """Locally an append; in object storage the object is read and written whole (what an
  object store offers), which costs the file's size per call: fine for metrics.jsonl."""
  if not is_remote(path):
    with open(path, "a") as f:
      f.write(text)
    return
  old = read_text(path) if exists(path) else ""
  _p(path).write_text(old + text)


def create_exclusive(path: str, text: str) -> None:
  """Creates the file holding `text`, or raises FileExistsError if it exists: exactly one of
  two racing callers wins (O_EXCL locally; an if-not-exists precondition on gs://)."""
  if is_remote(path):
    fsys, key = fsspec_of(path)
    with fsys.open(key, "xb") as f:  # epath offers no "x" mode
      f.write(text.encode())
    return
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  with os.fdopen(fd, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def mtime(path: str) -> float:
  """The last write, in seconds since the epoch."""
  if is_remote(path):
    fsys, key = fsspec_of(path)
    fsys.invalidate_cache(key)  # gcsfs caches listings: a heartbeat must be seen
    return fsys.modified(key).timestamp()
  return os.stat(path).st_mtime


def fsspec_of(path: str) -> tuple[Any, str]:
  """(fsspec filesystem, path within it): what epath does not offer (x mode, glob, find)."""
  import fsspec
  return fsspec.core.url_to_fs(path)


def touch(path: str) -> None:
  """Bumps the modification time (a lock's heartbeat): an object is rewritten with its text."""
  if is_remote(path):
    _p(path).write_text(read_text(path))
  else:
    os.utime(path)


def remove(path: str) -> None:
  if is_remote(path):
    _p(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Removes a folder and everything under it; quietly nothing if it is gone."""
  if is_remote(path):
    if exists(path):
      _p(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(src: str, dst: str) -> None:
  """A move within one filesystem or bucket (in object storage a copy of every object, then a
  delete: slow for big folders, never half-visible to a reader that lists finished steps)."""
  if is_remote(src):
    _p(src).rename(dst)
  else:
    os.rename(src, dst)
