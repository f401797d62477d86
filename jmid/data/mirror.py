"""Data sources in a gs:// bucket, read from a local copy under data.cache_dir.

The readers memory-map token files and seek in ArrayRecord/Parquet files, which a bucket does
not offer; a mid-training mixture is medium-sized, so each host copies the files it names once
(`<cache_dir>/remote/<bucket>/<path>`) and reads them locally at disk speed. A file is copied
again when its size or its generation in the bucket changed; each is written under a temporary
name and renamed, so a crash or Ctrl-C never leaves a torn copy, and processes sharing a cache
never read one half-written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Callable
from typing import Any

from jmid import fs
from jmid.data import atomic
from jmid.errors import UserError, first_line

MIRROR = "remote"


def local_copy(key: str, pattern: str, cache_dir: str) -> str:
  """gs://bucket/path (a file, a folder or a glob) -> the same pattern under the local copy,
  every file it matches copied there first (unless already there and unchanged)."""
  root = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), MIRROR)
  fsys, path = fs.fsspec_of(pattern)
  try:
    files = _matches(fsys, path)
  except Exception as e:
    raise UserError(f"{key}={pattern}: cannot list it ({first_line(e)}); check the bucket, the "
                    "path and the credentials") from None
  if not files:
    raise UserError(f"{key}={pattern!r}: no file matches in the bucket; check the path")
  with atomic.naming(f"data.cache_dir={cache_dir}", root):
    for name, info in files.items():
      _fetch(fsys, name, info, os.path.join(root, name))
  return os.path.join(root, path)


def _matches(fsys: Any, path: str) -> dict[str, dict[str, Any]]:
  """{object name: its info} for a file, every file under a folder, or a glob's files."""
  if glob.has_magic(path):
    found = fsys.glob(path, detail=True)
    return {n: i for n, i in found.items() if i.get("type") == "file"}
  if fsys.isdir(path):
    return fsys.find(path, detail=True)
  return {path: fsys.info(path)} if fsys.exists(path) else {}


def _fetch(fsys: Any, name: str, info: dict[str, Any], local: str) -> None:
  stamp = {"size": info.get("size"), "generation": str(info.get("generation", ""))}
  note = local + ".source.json"
  if os.path.exists(local) and os.path.exists(note):
    with open(note) as f:
      if json.load(f) == stamp:
        return
  os.makedirs(os.path.dirname(local), exist_ok=True)
  _replace(local, lambda tmp: fsys.get_file(name, tmp))
  _replace(note, lambda tmp: _write_json(tmp, stamp))


def _replace(path: str, write: Callable[[str], None]) -> None:
  """write(temporary name next to path), then renamed to path; the temporary removed on any
  failure (a process of its own: caches shared by the processes of a host stay whole)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f)
