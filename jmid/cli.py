"""One runner for every entry point (train, export, checkpoint, data.prepare).

`sys.exit(cli.run(main))`: the entry point's `main(argv)` does the work and raises; this maps
what it raised to one line on stderr and an exit code, never a traceback for a failure the
user can fix:
  UserError                              -> `jmid: error: ...`, exit 2
  OSError / MemoryError a user can fix    -> `jmid: error: <path>: <cause>; <fix>`, exit 2
  Interrupted (SIGINT/SIGTERM), Ctrl-C    -> `jmid: interrupted ...`, exit 128 + signal
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from jmid.errors import Interrupted, UserError, clean, os_problem


class StopFlag:
  """SIGINT/SIGTERM only set a flag, checked at safe points: start-up stops at its next phase
  boundary (a signal in the middle of an XLA compile must not unwind through C++, which
  crashed), the train loop at the next step, after saving. Installed before the heavy imports
  of an entry point, so a Ctrl-C in the first second is caught too."""

  def __init__(self) -> None:
    self.signum = 0
    self.elsewhere = False  # the signal went to another process of the job (StopVote)

  def __call__(self, signum: int, frame: Any) -> None:
    del frame
    again = " (again: stopping at the next safe point)" if self.signum else ""
    self.signum = self.signum or signum
    print(f"jmid: got {signal.Signals(signum).name}; stopping cleanly{again}", file=sys.stderr,
          flush=True)

  def install(self) -> dict[int, Any]:
    """Sets the handlers (main thread only); returns the ones they replace."""
    if threading.current_thread() is not threading.main_thread():
      return {}
    return {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

  @contextlib.contextmanager
  def installed(self) -> Iterator["StopFlag"]:
    old = self.install()
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)
      self.signum, self.elsewhere = 0, False

  def check(self, what_now: str = "nothing was changed; the next run starts normally") -> None:
    if self.signum:
      raise Interrupted(self.signum, what_now)


STOP = StopFlag()


class _DropOrbaxErrors(logging.Filter):
  """Drops ERROR records that come from orbax: logged in its files, naming its files or a
  TensorStore read of its checkpoint, or carrying an exception raised in them (asyncio's
  "exception was never retrieved" at exit, or whenever the reads a failed restore abandoned
  are freed). Nothing formats their tracebacks: checkpoint._quiet_abandoned_reads says why."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    orbax = f"{os.sep}orbax{os.sep}"
    files = [record.pathname, str(record.msg), str(record.args)]
    exc = record.exc_info[1] if record.exc_info else None
    for _ in range(8):  # the exception and what caused it (a chain can loop)
      if exc is None:
        break
      files += [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
      exc = exc.__cause__ or exc.__context__
    return not any(orbax in f or "in OCDBT database" in f for f in files)


_DROP_ORBAX_ERRORS = _DropOrbaxErrors()


def quiet_library_errors() -> None:
  """Orbax logs each failure of its background save threads with a traceback (hundreds of
  lines on a full disk) and then raises the same error to the caller, which reports it as one
  line; only that line is kept (asyncio repeats them for its tasks). Installed once."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _DROP_ORBAX_ERRORS not in logger.filters:
      logger.addFilter(_DROP_ORBAX_ERRORS)


def error(message: str) -> None:
  print(f"jmid: error: {clean(message)}", file=sys.stderr, flush=True)


def cpu_when_libtpu_has_no_chip() -> None:
  """libtpu installed on a host with no TPU (for jmid.plan, or the test extra) makes jax try
  its TPU backend first: screens of warnings on stderr and a host-wide lockfile taken, then
  the CPU anyway. Where no TPU or GPU device exists, jax goes straight to the CPU. Before any
  backend starts; an explicit JAX_PLATFORMS is left alone."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  chips = glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*") + glob.glob("/dev/nvidia[0-9]*")
  if chips:
    return
  import jax
  with contextlib.suppress(Exception):  # a backend already started: too late, harmless
    jax.config.update("jax_platforms", "cpu")


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
  """Calls main(argv) (default: sys.argv[1:]) and returns the process exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  cpu_when_libtpu_has_no_chip()
  try:
    return main(argv) or 0
  except UserError as e:
    error(str(e))
    return 2
  except Interrupted as e:
    name = signal.Signals(e.signum).name
    print(f"jmid: stopped by {name}; {e.what_now or 'stopped cleanly'}", file=sys.stderr,
          flush=True)
    return 128 + e.signum
  except KeyboardInterrupt:
    print("jmid: interrupted by SIGINT; stopped", file=sys.stderr, flush=True)
    return 128 + signal.SIGINT
  except (OSError, MemoryError) as e:
    line = os_problem(e)
    if line is None:
      raise
    error(line)
    return 2
