"""A run's claim on its workdir: refuse folders that are not runs, and one run at a time.

The lock is a file, `<workdir>/jmid.lock`, holding host, pid, the pid's start time and when the
run started; it works on local and shared filesystems (no flock, which NFS and FUSE buckets do
not honour) and in a gs:// bucket (jmid/fs.py). It is created exclusively (O_EXCL; an
if-not-exists precondition in a bucket), so of two runs starting at once exactly one wins, and
its mtime is refreshed every REFRESH_S seconds while the run lives. A lock whose holder is gone
never blocks a restart: on the same host the pid is dead (or is another process that reuses
the pid), on another host the lock has not been refreshed for STALE_AFTER_S seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from jmid import fs
from jmid.errors import UserError

LOCK = "jmid.lock"
REFRESH_S = 30.0
STALE_AFTER_S = 300.0
RUN_MARKERS = ("checkpoints", "metrics.jsonl")  # what only a jmid run writes
CONFIG_SECTIONS = {"run", "model", "train"}  # a jmid config.json has these top-level keys


def check_is_run(path: str) -> None:
  """Refuses (one line, touching nothing) an empty run.workdir and an existing folder that is
  neither empty nor a jmid run: a run must never write into someone else's folder."""
  if not path.strip():
    raise UserError("run.workdir is empty; name the run's folder, e.g. "
                    "--config.run.workdir=runs/my-run")
  if not fs.exists(path):
    return
  if not fs.isdir(path):
    raise UserError(f"run.workdir={path} is a file, not a folder; give a new folder")
  entries = set(fs.listdir(path)) - {LOCK}
  if not entries or is_run(path):
    return
  what = ("a Hugging Face model folder" if "config.json" in entries and
          any(e.endswith(".safetensors") or e.endswith(".bin") for e in entries)
          else f"{len(entries)} entries, e.g. {', '.join(sorted(entries)[:3])}")
  raise UserError(f"run.workdir={path} exists and is not a jmid run ({what}); nothing was "
                  "written: give a new or empty folder")


def is_run(path: str) -> bool:
  if any(fs.exists(os.path.join(path, m)) for m in RUN_MARKERS):
    return True
  try:
    return CONFIG_SECTIONS <= set(json.loads(fs.read_text(os.path.join(path, "config.json"))))
  except (OSError, ValueError, TypeError):
    return False


def _pid_start(pid: int) -> str:
  """The pid's start time in clock ticks since boot ('' where /proc has none): with the pid it
  names one process, so a pid reused after a crash is not mistaken for the holder."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _alive(pid: int, start: str) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return not start or _pid_start(pid) in ("", start)


def _read(path: str) -> tuple[dict[str, Any], float]:
  """(holder, mtime); holder {} if the file is torn (a writer died between open and write)."""
  mtime = fs.mtime(path)
  try:
    return json.loads(fs.read_text(path)), mtime
  except (OSError, ValueError):
    return {}, mtime


def _stale_reason(holder: dict[str, Any], mtime: float) -> str:
  """Why the holder is gone ('' if it may be alive)."""
  age = time.time() - mtime
  if holder.get("host") == socket.gethostname():
    pid = int(holder.get("pid", -1))
    if pid == os.getpid():
      return "left by this process"
    if pid <= 0 or not _alive(pid, str(holder.get("pid_start", ""))):
      return f"pid {pid} on this host is gone"
    return ""
  if age > STALE_AFTER_S:
    return f"not refreshed for {age / 60:.0f} min"
  if not holder and age > 10:
    return "empty lock file"
  return ""


def _describe(holder: dict[str, Any]) -> str:
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {since}"


class Lock:
  """The held lock: refreshed by a daemon thread, released by `release()` (idempotent)."""

  def __init__(self, path: str, token: str) -> None:
    self.path, self.token, self.lost = path, token, False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._refresh, daemon=True, name="jmid-lock")
    self._thread.start()

  def _ours(self) -> bool:
    try:
      return _read(self.path)[0].get("token") == self.token
    except OSError:
      return False

  def _refresh(self) -> None:
    while not self._stop.wait(REFRESH_S):
      if not self._ours():  # taken over by a run that judged us dead: stop writing
        self.lost = True
        return
      try:
        fs.touch(self.path)
      except Exception:  # a bucket's transient error: the next heartbeat tries again
        pass

  def check(self) -> None:
    """Raises when another run took the workdir over (this one must stop writing to it)."""
    if self.lost:
      raise UserError(f"the lock {self.path} was taken over by another run (this run looked "
                      "dead to it: a frozen host?); stopping without writing more")

  def release(self) -> None:
    self._stop.set()
    if self._ours():
      try:
        fs.remove(self.path)
      except OSError:
        pass


def acquire(workdir: str) -> tuple[Lock, str]:
  """Takes the workdir's lock; returns (lock, a note when a stale lock was taken over).

  A live holder is one UserError naming it. The workdir must exist."""
  path = os.path.join(workdir, LOCK)
  token = uuid.uuid4().hex
  me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
        "started": time.time(), "token": token}
  note = ""
  for _ in range(5):
    try:
      fs.create_exclusive(path, json.dumps(me))
    except FileExistsError:
      try:
        holder, mtime = _read(path)
      except FileNotFoundError:
        continue  # released between our open and our read
      why = _stale_reason(holder, mtime)
      if not why:
        raise UserError(f"run.workdir={workdir} is in use by another run ({_describe(holder)}; "
                        f"lock {path}); wait for it to end or stop it, or use another "
                        "run.workdir") from None
      if _take_over(path, holder):
        note = f"took over the stale lock of {_describe(holder)} ({why})"
      continue
    return Lock(path, token), note
  raise UserError(f"run.workdir={workdir}: could not take the lock {path} (other runs keep "
                  "taking it); is another run starting on this workdir?")


def _take_over(path: str, holder: dict[str, Any]) -> bool:
  """Moves the stale lock aside under a private name; False if another run got there first
  (then the lock we moved, if it is not the stale one, goes back). In a bucket, where a rename
  is a copy, the stale lock is deleted if it is still the one judged stale (a narrower race,
  between that read and the delete, than a local rename leaves)."""
  if fs.is_remote(path):
    try:
      if _read(path)[0].get("token") != holder.get("token"):
        return False
      fs.remove(path)
    except FileNotFoundError:
      return False
    return True
  private = f"{path}.stale-{uuid.uuid4().hex}"
  try:
    os.rename(path, private)
  except FileNotFoundError:
    return False
  try:
    moved, _ = _read(private)
  except OSError:
    moved = {}
  if moved.get("token") != holder.get("token"):  # a live lock taken in the meantime: restore
    try:
      os.link(private, path)
    except OSError:
      pass
    os.remove(private)
    return False
  os.remove(private)
  return True


class Claim:
  """What a start created in the workdir, so a failed start removes exactly that."""

  def __init__(self, workdir: str) -> None:
    self.workdir = workdir
    self.created = _outermost_missing(workdir)  # "" when the workdir exists
    self.before: set[str] = set()

  def snapshot(self) -> None:
    """Called once the lock is held, so entries of a run that started at the same moment are
    never counted as ours."""
    self.before = set(fs.listdir(self.workdir))

  def undo(self) -> None:
    """Removes the workdir (and the parents made for it) if this start made it, else only the
    entries it added."""
    if self.created:
      fs.rmtree(self.created)
      return
    for name in set(fs.listdir(self.workdir)) - self.before - {LOCK}:
      p = os.path.join(self.workdir, name)
      fs.rmtree(p) if fs.isdir(p) else fs.remove(p)


def _outermost_missing(path: str) -> str:
  """The outermost folder that making `path` creates (a bucket has no folders: `path`)."""
  if fs.exists(path):
    return ""
  if fs.is_remote(path):
    return path
  top = os.path.abspath(path)
  parent = os.path.dirname(top)
  while parent != top and not os.path.exists(parent):
    top, parent = parent, os.path.dirname(parent)
  return top
