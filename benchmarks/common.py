"""What every benchmark script shares: the provenance stamped on a result, and writing it."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any


def write_result(path: str, result: dict[str, Any]) -> None:
  """Adds date, machine, Python and jax (when imported) to `result` and writes it as JSON."""
  import sys
  stamp = {"date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "python": platform.python_version()}
  if "jax" in sys.modules:
    jax = sys.modules["jax"]
    stamp.update(jax=jax.__version__, device=jax.devices()[0].device_kind,
                 n_devices=jax.device_count())
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({**stamp, **result}, f, indent=2)
  print(f"wrote {path}")
