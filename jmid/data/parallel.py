"""An ordered, bounded map over worker processes that fails cleanly when a worker is killed.

Two CPython behaviours shape it. A worker killed while sending a large result (the OOM killer)
leaves a half-written message that ProcessPoolExecutor waits on forever, so results travel
through files and only a short path goes through the pipe (pipe writes under 4 KiB are
atomic). And an exception raised by a signal handler inside the executor's locks can deadlock
its shutdown, so SIGINT/SIGTERM only set a flag that the map checks at safe points.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from jmid.errors import Interrupted, UserError

_STOP: list[int] = []  # signals received, oldest first


def on_signal(signum: int, frame: Any) -> None:
  """A handler for SIGINT/SIGTERM that only records the signal; a second one stops at once."""
  if _STOP:
    raise KeyboardInterrupt
  _STOP.append(signum)


def check_stop() -> None:
  if _STOP:
    raise Interrupted(_STOP[0])


def _start_worker(initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
  """Ctrl-C is the parent's to handle; a worker whose parent died (SIGKILL) exits instead of
  waiting forever. SIGTERM keeps its default: the executor stops broken pools with it."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = multiprocessing.parent_process()
  if parent is not None:
    sentinel = parent.sentinel
    threading.Thread(target=lambda: (multiprocessing.connection.wait([sentinel]), os._exit(1)),
                     daemon=True).start()
  initializer(*initargs)


def _to_file(fn: Callable[[Any], Any], item: Any, path: str) -> str:
  result = fn(item)
  with open(path, "wb") as f:
    pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
  return path


def _from_file(future: Future[str]) -> Any:
  """The result behind a future, checking for a stop request while waiting."""
  while True:
    check_stop()
    try:
      path = future.result(timeout=0.2)
      break
    except TimeoutError:
      continue
  with open(path, "rb") as f:
    result = pickle.load(f)
  os.remove(path)
  return result


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int,
                initializer: Callable[..., None], initargs: tuple[Any, ...]) -> Iterator[Any]:
  """fn over items in `workers` spawned processes (in this one if workers == 1), in order, with
  at most 2 * workers + 2 items in flight so memory stays flat. fn and initializer must be
  module-level functions. A killed worker is a UserError, not a hang."""
  if workers == 1:
    initializer(*initargs)
    for item in items:
      check_stop()
      yield fn(item)
    return
  scratch = tempfile.mkdtemp(prefix="jmid-results-")
  ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
  try:
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                             initargs=(initializer, initargs)) as pool:
      pending: collections.deque[Future[str]] = collections.deque()
      try:
        for k, item in enumerate(items):
          check_stop()
          pending.append(pool.submit(_to_file, fn, item, os.path.join(scratch, str(k))))
          if len(pending) >= 2 * workers + 2:
            yield _from_file(pending.popleft())
        while pending:
          yield _from_file(pending.popleft())
      except BrokenProcessPool:
        check_stop()
        raise UserError("a worker process died (killed, or out of memory?); try fewer "
                        "workers") from None
      finally:
        for f in pending:
          f.cancel()
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
