"""Outputs that appear whole or not at all, and filesystem failures as one line naming them.

Every writer of a directory (prepare's token files, the demo corpus, export's Hugging Face
folder) writes into a temp sibling and renames it into place. On any failure (full disk,
read-only volume, Ctrl-C) the writer removes its own temp folder, and `make_parents` lets it
remove the empty parent folders it created, so a failed command leaves nothing behind.
`naming(label, under)` turns the OSError of such a failure into one UserError line that names
the output the user asked for, not a temp file they never saw.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from jmid.errors import UserError, os_problem


def make_parents(path: str) -> list[str]:
  """Creates the missing folders up to and including `path`; returns those it created,
  outermost first, so a failed writer can remove them again (remove_empty)."""
  missing = []
  d = os.path.abspath(path)
  while not os.path.isdir(d) and d != os.path.dirname(d):
    missing.append(d)
    d = os.path.dirname(d)
  made = []
  try:
    for m in reversed(missing):
      try:
        os.mkdir(m)
      except FileExistsError:
        continue
      made.append(m)
  except BaseException:
    remove_empty(made)
    raise
  return made


@contextlib.contextmanager
def temp_sibling(out: str) -> Iterator[str]:
  """A new temp folder next to `out` (missing parents made) for the block to fill and rename
  to `out`; if the block fails, the temp folder and the parents made for it are removed."""
  parent = os.path.dirname(os.path.abspath(out))
  made = make_parents(parent)
  tmp = None
  try:
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    yield tmp
  except BaseException:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    remove_empty(made)
    raise


def remove_empty(made: list[str]) -> None:
  """Removes the folders make_parents created, innermost first, where they are still empty."""
  for d in reversed(made):
    try:
      os.rmdir(d)
    except OSError:
      return


@contextlib.contextmanager
def naming(label: str, under: str) -> Iterator[None]:
  """An OSError a user can fix (no space, read-only, permission) raised in the block becomes
  `UserError("<label>: <cause>; <fix>")` when it concerns a path starting with `under` (the
  output, its temp siblings) or names no path (a failed write); other paths keep their name."""
  try:
    yield
  except OSError as e:
    name = e.filename
    ours = name is None or str(name).startswith(under)
    line = os_problem(OSError(e.errno, e.strerror) if ours else e, label)
    if line is None:
      raise
    raise UserError(line) from None
