"""Grain building blocks: documents of one source -> packed rows -> model batches.

Kept apart from pipeline.py so the per-source chain (subset, shuffle, split, pack) reads top to
bottom in one function. Every piece is a picklable class, not a lambda, so the same pipeline
can later run under grain's multiprocessing prefetch.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

# Bins a first-fit packer fills before it emits them: more bins, less padding, more memory.
FIRST_FIT_BINS = 32


class DocSubset:
  """The documents `indices` of a source, as a grain RandomAccessDataSource.

  A source returns {"tokens": int32 [n], "mask": int32 [n]} per document, where mask is 1 on
  tokens that may be trained on as targets (0 on a chat prompt).
  """

  def __init__(self, source: Any, indices: np.ndarray) -> None:
    self.source = source
    self.indices = np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return self.source[int(self.indices[i])]

  def __repr__(self) -> str:
    return f"DocSubset({self.source!r}, n={len(self)})"


class SplitLong(grain.experimental.FlatMapTransform):
  """Cuts a document into pieces of at most `max_len` tokens (packers need them to fit a row).

  Each piece becomes its own segment, so positions restart at 0 in every piece.
  """

  max_fan_out = 1 << 30  # not enforced on IterDatasets; documents may be very long

  def __init__(self, max_len: int) -> None:
    self.max_len = max_len

  def flat_map(self, doc: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(doc["tokens"])
    return [{"tokens": doc["tokens"][i:i + self.max_len], "mask": doc["mask"][i:i + self.max_len]}
            for i in range(0, n, self.max_len)]


class Shift(grain.transforms.Map):
  """A packed row of seq_len + 1 tokens -> next-token inputs/targets with masks."""

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tok = row["tokens"].astype(np.int32, copy=False)
    seg = row["tokens_segment_ids"].astype(np.int32, copy=False)
    pos = row["tokens_positions"].astype(np.int32, copy=False)
    # A target counts only if it continues its input's document (never padding, never the
    # first token of the next document packed behind it) and its own mask allows it (a chat
    # prompt's tokens are context, not targets).
    mask = (seg[:-1] == seg[1:]) & (seg[:-1] != 0) & (row["mask"][1:] != 0)
    out = {"inputs": tok[:-1], "targets": tok[1:], "segment_ids": seg[:-1],
           "positions": pos[:-1], "loss_mask": mask.astype(np.int32)}
    if "source" in row:
      out["source"] = row["source"]
    return out


def packed_rows(source: Any, indices: np.ndarray, *, seq_len: int, packing: str,
                shuffle_seed: int | None, repeat: bool) -> grain.IterDataset:
  """Rows of seq_len + 1 tokens with `tokens_segment_ids` (1.., 0 = pad) and `tokens_positions`.

  With a shuffle seed the document order is a fresh permutation every epoch: grain's
  ShuffleMapDataset seeds epoch e with seed + e, and repeat() only extends the index range.
  """
  ds = grain.MapDataset.source(DocSubset(source, indices))
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  if repeat:
    ds = ds.repeat()
  # Reading a document is a memmap slice: reader threads only add GIL contention (measured:
  # 2.9 M tokens/s without, 1.7 M with 2 threads, seq_len 256 on 2 cores).
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  row = seq_len + 1
  it = grain.experimental.FlatMapIterDataset(it, SplitLong(row))
  lengths = {"tokens": row, "mask": row}
  if packing == "concat":
    return grain.experimental.ConcatThenSplitIterDataset(it, length_struct=lengths)
  if packing == "first_fit":
    return grain.experimental.FirstFitPackIterDataset(
        it, length_struct=lengths, num_packing_bins=FIRST_FIT_BINS,
        seed=shuffle_seed or 0, shuffle_bins=shuffle_seed is not None)
  raise ValueError(f"unknown packing {packing!r}")


def batches(rows: grain.IterDataset, batch_size: int) -> grain.IterDataset:
  """Shifted, stacked [batch_size, seq_len] int32 batches; a partial last batch is dropped."""
  return rows.map(Shift()).batch(batch_size, drop_remainder=True)
