"""Progress line, metrics.jsonl and TensorBoard; only process 0 writes.

On resume, lines of metrics.jsonl past the restored step are dropped (the run replays them), and
so is a torn line (what a crash in the middle of a write leaves), so the file always reads as
one consistent run. Non-finite values are written as null and shown as nan, never a crash.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jmid import fs
from jmid.config import ModelConfig

# Dense bf16 peak FLOP/s per chip by device_kind substring (datasheets); CPUs have none.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device: jax.Device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for key, value in PEAK_FLOPS.items():
    if key in kind:
      return value
  return None


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul params + attention, 12 H D per key a query sees on
  average: T/2 under causality (the usual 6 L T H D), about the window in a local layer."""
  per_layer = m.d_model * m.dh * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff
  matmul_params = m.n_layers * per_layer + m.d_model * m.vocab_size
  keys = sum(_keys_per_query(seq_len, m.sliding_window if kind == "L" else 0)
             for kind in m.layer_kinds)
  return 6.0 * matmul_params + 12.0 * m.n_heads * m.dh * keys


def _keys_per_query(t: int, window: int) -> float:
  """Keys a query attends to, averaged over a causal row of t tokens (window 0: no window)."""
  if not window or window >= t:
    return t / 2
  return (window * (window + 1) / 2 + (t - window) * window) / t


def _fmt_time(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class MetricsWriter:
  """Writes one record per log step to the console, metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled, self.total_steps = enabled, total_steps
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    fs.makedirs(workdir)
    self._truncate_after(start_step)
    self._tb = TensorBoard(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    if not fs.exists(self.path):
      return
    kept = [line for line in fs.read_text(self.path).splitlines(keepends=True)
            if _step_of(line) <= step]
    fs.write_text(self.path, "".join(kept))

  def write(self, step: int, record: dict[str, Any], console: bool = True,
            eta_seconds: float = float("nan")) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _plain(v) for k, v in record.items()}}
    with _named(self.path):
      fs.append_text(self.path, json.dumps(record) + "\n")
    self._tb.write(step, {k: v for k, v in record.items()
                          if k != "step" and isinstance(v, (int, float))})
    if console:
      print(self.line(step, record, eta_seconds), flush=True)

  def line(self, step: int, r: dict[str, Any], eta_seconds: float) -> str:
    parts = [f"step {step}/{self.total_steps}"]
    if "loss" in r:
      parts.append(f"loss {_num(r['loss'], '.4f')}")
    if "lr" in r:
      parts.append(f"lr {_num(r['lr'], '.2e')}")
    if r.get("skipped_steps"):
      parts.append(f"skipped {r['skipped_steps']}")
    if r.get("tokens_per_sec"):
      parts.append(f"{r['tokens_per_sec'] / 1e3:,.1f}k tok/s")
    if r.get("mfu") is not None:
      parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts += [f"{k} {_num(v, '.4f')}" for k, v in r.items()  # bits per byte: jsonl only
              if k.startswith("eval/") and not k.endswith("/bpb")]
    parts.append(f"ETA {_fmt_time(eta_seconds)}")
    return " | ".join(parts)

  def close(self) -> None:
    if self._tb is not None:
      tb, self._tb = self._tb, None
      tb.close()


class TensorBoard:
  """Scalars in a TensorBoard event file, written and flushed in the caller's thread at each
  log step. tensorboardX's SummaryWriter flushes from its own thread: there a full disk is a
  traceback on stderr that no caller can catch, and the events written after it are lost.
  In a bucket (no appends) the file is written locally and copied up whole at each flush."""

  def __init__(self, logdir: str) -> None:
    from tensorboardX.event_file_writer import EventsWriter  # lazily: only process 0 writes
    self.logdir, self.remote = logdir, fs.is_remote(logdir)
    local = tempfile.mkdtemp(prefix="jmid-tensorboard-") if self.remote else logdir
    fs.makedirs(local)
    with _named(logdir):
      self._file = EventsWriter(os.path.join(local, "events"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar
    now = time.time()
    with _named(self.logdir):
      for key, value in scalars.items():
        self._file.write_event(Event(wall_time=now, step=step, summary=scalar(key, value)))
      self._file.flush()
      self._upload()

  def _upload(self) -> None:
    if self.remote:
      local = self._file._file_name
      with open(local, "rb") as f:
        fs.write_bytes(os.path.join(self.logdir, os.path.basename(local)), f.read())

  def close(self) -> None:
    with _named(self.logdir):
      self._file.close()
      self._upload()
      if self.remote:
        shutil.rmtree(os.path.dirname(self._file._file_name), ignore_errors=True)


@contextlib.contextmanager
def _named(path: str) -> Iterator[None]:
  """An OSError in the block carries `path`: a full disk's failed write or flush names none,
  and the loop's one-line report (errors.os_problem) shows the filename it carries."""
  try:
    yield
  except OSError as e:
    raise OSError(e.errno, e.strerror, path) from None


def _num(v: Any, fmt: str) -> str:
  """A number for the console; None (a non-finite value in the record) reads as nan."""
  return format(v, fmt) if isinstance(v, (int, float)) else "nan"


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl line; inf (dropped) for a blank or torn line."""
  try:
    return float(json.loads(line).get("step", 0)) if line.strip() else math.inf
  except (ValueError, AttributeError):
    return math.inf


def _plain(v: Any) -> Any:
  try:
    v = v.item() if hasattr(v, "item") else v
  except (TypeError, ValueError):
    return v
  return None if isinstance(v, float) and not math.isfinite(v) else v


class Stopwatch:
  """Wall time between log steps, excluding time marked as paused (eval, first compile)."""

  def __init__(self) -> None:
    self.t0, self.paused = time.perf_counter(), 0.0

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0 - self.paused

  def reset(self) -> None:
    self.t0, self.paused = time.perf_counter(), 0.0


def eprint(*args: Any) -> None:
  print(*args, file=sys.stderr, flush=True)


class Evaluator:
  """Mean loss per target token and bits per byte, per source and over all sources."""

  def __init__(self, eval_step: Any, eval_sets: dict[str, list[dict]],
               bytes_per_token: dict[str, float]) -> None:
    self.eval_step, self.eval_sets, self.bytes_per_token = eval_step, eval_sets, bytes_per_token

  def __call__(self, params: dict) -> dict[str, float]:
    out, total_ce, total_n = {}, 0.0, 0.0
    for source, batches in self.eval_sets.items():
      if not batches:
        continue
      sums = [self.eval_step(params, b) for b in batches]
      ce = float(sum(s["ce_sum"] for s in sums))
      n = float(sum(s["count"] for s in sums))
      loss = ce / max(n, 1.0)
      out[f"eval/{source}/loss"] = loss
      out[f"eval/{source}/bpb"] = loss / math.log(2) / self.bytes_per_token[source]
      total_ce, total_n = total_ce + ce, total_n + n
    out["eval/loss"] = total_ce / max(total_n, 1.0)
    return out


class MixCounter:
  """Realised token share of each source over a log interval (padding not counted)."""

  def __init__(self, names: list[str]) -> None:
    self.names, self.counts = names, np.zeros(len(names))

  def add(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Counts the batch's rows and returns it without `source` (which stays on the host)."""
    batch = dict(batch)
    tokens = (batch["segment_ids"] != 0).sum(axis=1)
    self.counts += np.bincount(batch.pop("source"), weights=tokens, minlength=len(self.names))
    return batch

  def shares(self) -> dict[str, float]:
    total = max(self.counts.sum(), 1.0)
    out = {f"mix/{n}": float(c / total) for n, c in zip(self.names, self.counts)}
    self.counts[:] = 0
    return out
