"""A mixture whose weights change over training steps, drawn row by row.

Each source is packed into rows first; then row r of the stream comes from the source drawn by an
RNG seeded with (seed, r), with the weights of step r // rows_per_step. So the weights are token
proportions (every row holds seq_len tokens), the stream is a pure function of (seed, r), and the
iterator's state is just r plus each source's own packer state: resume is exact.
grain's IterDataset.mix cannot do this: it interleaves by fixed integer proportions.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jmid.config import MixtureStage


class Schedule:
  """Weights per step from (start_step, {source: weight}) stages, held or linearly blended."""

  def __init__(self, names: Sequence[str], stages: Sequence[MixtureStage],
               interpolation: str = "step") -> None:
    self.names = list(names)
    self.starts = [s for s, _ in stages]
    self.table = np.array([[float(w.get(n, 0.0)) for n in self.names] for _, w in stages])
    self.interpolation = interpolation

  def weights(self, step: int) -> np.ndarray:
    """Normalised weights (summing to 1) in the order of `names`."""
    i = max(bisect.bisect_right(self.starts, step) - 1, 0)
    w = self.table[i]
    if self.interpolation == "linear" and i + 1 < len(self.starts):
      frac = (step - self.starts[i]) / (self.starts[i + 1] - self.starts[i])
      w = (1.0 - frac) * w + frac * self.table[i + 1]
    return w / w.sum()


def choose(seed: int, row: int, weights: np.ndarray) -> int:
  """The source of stream row `row`: a stateless draw, identical on resume."""
  u = np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), row])).random()
  return min(int(np.searchsorted(np.cumsum(weights), u, side="right")), len(weights) - 1)


class ScheduledMixIterDataset(grain.IterDataset):
  """Rows drawn from `parents` by `schedule`; each row gains a scalar `source` feature."""

  def __init__(self, parents: Sequence[grain.IterDataset], schedule: Schedule,
               rows_per_step: int, seed: int) -> None:
    super().__init__(list(parents))
    self._schedule, self._rows_per_step, self._seed = schedule, rows_per_step, seed

  def __iter__(self) -> grain.DatasetIterator:
    return _ScheduledMixIterator(self)

  def __str__(self) -> str:
    return f"ScheduledMixIterDataset(sources={self._schedule.names})"


class _ScheduledMixIterator(grain.DatasetIterator):

  # grain's __del__ reads _closed, which its __init__ sets: when building a parent iterator
  # fails (a MemoryError in a packer), __del__ must not print a second, unrelated traceback.
  _closed = True

  def __init__(self, ds: ScheduledMixIterDataset) -> None:
    super().__init__([iter(p) for p in ds.parents])
    self._ds = ds
    self._row = 0

  def __next__(self) -> dict[str, Any]:
    ds = self._ds
    weights = ds._schedule.weights(self._row // ds._rows_per_step)
    k = choose(ds._seed, self._row, weights)
    element = dict(next(self._parents[k]))
    element["source"] = np.int32(k)
    self._row += 1
    return element

  def get_state(self) -> dict[str, Any]:
    return {"row": self._row, "parents": [p.get_state() for p in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._row = int(state["row"])
    for parent, s in zip(self._parents, state["parents"], strict=True):
      parent.set_state(s)
