"""The errors a user can cause or fix, and how any failure becomes one readable line.

Every entry point runs through jmid/cli.py, which prints `jmid: error: <message>` and exits 2
for a UserError, and uses `os_problem` to turn a filesystem failure (also one raised inside
Orbax or TensorStore, which wrap it in their own exception types) into the same kind of line.
"""

from __future__ import annotations

import errno
import re

# errno -> (cause as a user reads it, what to do)
OS_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free space or point it elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space or point it elsewhere"),
    errno.EROFS: ("read-only filesystem", "point it at a writable location"),
    errno.EACCES: ("permission denied", "fix its permissions or point it elsewhere"),
    errno.EPERM: ("operation not permitted", "fix its permissions or point it elsewhere"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "check the path"),
}
# how wrapped errors spell those causes in their messages (TensorStore, Orbax, absl)
_SPELLINGS = {
    errno.ENOSPC: ("no space left on device", "[errno 28]", "resource_exhausted"),
    errno.EDQUOT: ("disk quota exceeded", "[errno 122]"),
    errno.EROFS: ("read-only file system", "[errno 30]"),
    errno.EACCES: ("permission denied", "[errno 13]"),
}


class UserError(Exception):
  """A mistake the user can fix; printed as one line, exit code 2, no traceback."""


class ConfigError(UserError):
  """A config value that is unknown, out of range or inconsistent with another."""


class Interrupted(BaseException):
  """SIGINT/SIGTERM, raised at a safe point after cleaning up; the CLI exits 128 + signum.
  A BaseException, so no `except Exception` on the way swallows it."""

  def __init__(self, signum: int, what_now: str = "") -> None:
    super().__init__(signum, what_now)
    self.signum, self.what_now = signum, what_now


def first_line(e: BaseException) -> str:
  """The first line of an exception's text, cleaned of raw library reprs, at most 300 chars."""
  text = clean(str(e)).splitlines()
  return text[0][:300] if text else type(e).__name__


def clean(msg: str) -> str:
  """Removes `<bound method ...>` / `<... object at 0x...>` reprs (TensorStore's specs too) and
  escaped newlines."""
  msg = re.sub(r"\s*See full TensorStore details: <bound method .*?\}\)>\.?", "", msg, flags=re.S)
  msg = re.sub(r"\s*\[(source locations|tensorstore_spec)='[^']*'\]", "", msg)
  msg = re.sub(r"<(bound method|built-in method|function)[^<>]*>", "", msg)
  msg = re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "", msg)
  msg = msg.replace("\\n", " ").replace("\\'", "'")
  return re.sub(r"[ \t]{2,}", " ", msg).strip()


def _chain(e: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def os_problem(e: BaseException, path: str = "") -> str | None:
  """One line naming the path and the cause when `e` (or what it wraps) is a filesystem
  failure a user can fix (no space, read-only, permission, missing); else None."""
  for x in _chain(e):
    if isinstance(x, MemoryError):
      return ("out of host memory; use a smaller data.seq_len / train.global_batch or more "
              "train.microbatches")
    if isinstance(x, OSError) and x.errno in OS_CAUSES:
      cause, fix = OS_CAUSES[x.errno]
      where = x.filename or path
      return f"{where}: {cause}; {fix}" if where else f"{cause}; {fix}"
    text = str(x).lower()
    for code, spellings in _SPELLINGS.items():
      if any(s in text for s in spellings):
        cause, fix = OS_CAUSES[code]
        return f"{path}: {cause}; {fix}" if path else f"{cause}; {fix}"
  return None
