"""Resuming a run that changed: a config that differs from the checkpoint's, a rollback.

A resume must either be exact or say what differs. `config_changes` names every key that
differs from the checkpoint's config; those that break an exact resume (config.RESUME_BREAKING:
the data stream and batch rows depend on them) are refused unless the user allows them.
`rollback` implements train.resume_step: newer checkpoints are moved aside, never deleted.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from jmid import fs
from jmid.config import RESUME_BREAKING, RESUME_SILENT
from jmid.errors import UserError

ROLLED_BACK = "rolled-back"  # checkpoints/rolled-back-<time>/<step>: not a step Orbax lists
MARKER = "ROLLBACK.json"
COMMIT_MARKER = "commit_success.txt"  # what Orbax writes last into a finished step


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'key: old -> new' for every leaf key that differs (JSON-normalised, so tuples and lists of
  the same values are equal), sorted; config.RESUME_SILENT keys are left out, and so are keys
  the checkpoint's config lacks (added by a newer jmid, not changed by the user)."""
  old = _flatten(json.loads(json.dumps(saved)))
  new = _flatten(json.loads(json.dumps(current)))
  keys = sorted(k for k in old if old[k] != new.get(k, "(absent)")
                and not k.startswith(RESUME_SILENT))
  return [f"{k}: {_short(old.get(k, '(absent)'))} -> {_short(new.get(k, '(absent)'))}"
          for k in keys]


def _short(v: Any) -> str:
  s = json.dumps(v) if not isinstance(v, str) else repr(v)
  return s if len(s) <= 60 else s[:57] + "..."


def check_changes(changes: list[str], allow: bool, step_dir: str) -> str:
  """Raises for a change that breaks an exact resume unless allowed; returns the note for the
  first line ('' when nothing changed)."""
  if not changes:
    return ""
  breaking = [ch for ch in changes if ch.split(":", 1)[0].startswith(RESUME_BREAKING)]
  if breaking and not allow:
    raise UserError(f"resuming {step_dir} with a changed {'; '.join(breaking[:3])} would not "
                    "continue the same data stream; restore the old value, start a new run "
                    "(new run.workdir with init.from_path), or set "
                    "train.allow_resume_changes=True")
  note = "; ".join(changes[:6]) + (f" (+{len(changes) - 6} more)" if len(changes) > 6 else "")
  allowed = " (allowed by train.allow_resume_changes: not an exact resume)" if breaking else ""
  return f"config changed since the checkpoint: {note}{allowed}"


def checkpoint_steps(ckpt_dir: str) -> list[int]:
  """The finished steps in a checkpoints/ folder. Orbax names them by the step alone; locally
  it renames a step there when it is finished, in a bucket (no renames) it writes the step in
  place and adds COMMIT_MARKER last."""
  if not fs.isdir(ckpt_dir):
    return []
  steps = [d for d in fs.listdir(ckpt_dir) if d.isdigit()]
  if fs.is_remote(ckpt_dir):
    steps = [d for d in steps if fs.exists(os.path.join(ckpt_dir, d, COMMIT_MARKER))]
  return sorted(int(d) for d in steps)


def _applied(ckpt_dir: str, step: int) -> str:
  """The rolled-back folder of an earlier rollback to `step`, or ''."""
  for d in sorted(fs.listdir(ckpt_dir)):
    marker = os.path.join(ckpt_dir, d, MARKER)
    if d.startswith(ROLLED_BACK) and fs.exists(marker):
      try:
        if json.loads(fs.read_text(marker)).get("to") == step:
          return os.path.join(ckpt_dir, d)
      except (OSError, ValueError):
        continue
  return ""


def rollback(ckpt_dir: str, step: int) -> str:
  """train.resume_step=step: moves every newer checkpoint into checkpoints/rolled-back-<time>/
  (kept for inspection) so the resume starts at `step`; returns the note for the first line.

  Applied once: a restart with the same setting (a requeued job) resumes from the latest."""
  have = checkpoint_steps(ckpt_dir)
  if step not in have:
    raise UserError(f"train.resume_step={step}: no such checkpoint in {ckpt_dir} (steps: "
                    f"{', '.join(map(str, have)) or 'none'}); pick one of them or -1 for the "
                    "latest")
  done = _applied(ckpt_dir, step)
  if done:
    return f"train.resume_step={step} was applied before ({done}); resuming from the latest"
  newer = [s for s in have if s > step]
  if not newer:
    return ""
  aside = set_aside(ckpt_dir, newer, ROLLED_BACK, {"to": step})
  return (f"rolled back to step {step}: checkpoints {', '.join(map(str, newer))} moved to "
          f"{aside}")


def set_aside(ckpt_dir: str, steps: list[int], label: str, why: dict[str, Any]) -> str:
  """Moves step folders into checkpoints/<label>-<time>/ (Orbax no longer lists them, nor
  deletes them, nor refuses to save a step of the same number) with a note of why."""
  aside = os.path.join(ckpt_dir, f"{label}-{time.strftime('%Y%m%d-%H%M%S')}")
  fs.makedirs(aside)
  fs.write_text(os.path.join(aside, MARKER if label == ROLLED_BACK else "WHY.json"),
                json.dumps({**why, "moved": steps, "time": time.time()}))
  for s in steps:
    fs.rename(os.path.join(ckpt_dir, str(s)), os.path.join(aside, str(s)))
  return aside
