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

import signal
import sys
from collections.abc import Callable

from jmid.errors import Interrupted, UserError, clean, os_problem


def error(message: str) -> None:
  print(f"jmid: error: {clean(message)}", file=sys.stderr, flush=True)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
  """Calls main(argv) (default: sys.argv[1:]) and returns the process exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return main(argv) or 0
  except UserError as e:
    error(str(e))
    return 2
  except Interrupted as e:
    name = signal.Signals(e.signum).name
    print(f"jmid: interrupted by {name}; stopped cleanly", file=sys.stderr, flush=True)
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
