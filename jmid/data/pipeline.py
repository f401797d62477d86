"""The data the trainer sees: a checkpointable mixed train iterator, fixed eval batches, and the
unigram baseline a model must beat.

How the trainer uses it:
  paths = resolve_sources(cfg.data)           # name -> token-file dir (ALL sources, weight 0 too)
  it = train_iterator(cfg.data, paths, batch_size=per_process_batch, seed=cfg.run.seed,
                      process_index=jax.process_index(), process_count=jax.process_count())
  evals = eval_batches(cfg.data, paths, batch_size=..., n_batches=..., seed=cfg.run.seed)
Mixture weights are NOT returned by resolve_sources: train_iterator reads them with
`source_weights(cfg, paths)` (cfg.sources[name].weight; in demo mode equal weights when
cfg.sources is empty). Weight-0 sources are left out of training but still get eval batches,
so a run can watch a source it does not train on (e.g. forgetting).

`seed` picks the held-out split (and the shuffle order): use the same seed for train_iterator,
eval_batches and unigram_loss, and keep it (or `split_seed`) fixed across the stages of one
lineage, or documents held out in one stage may be trained on in the next.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import grain
import numpy as np

from jmid.config import DataConfig, UserError
from jmid.data import demo, packing
from jmid.data.tokenfile import TokenFile

UNIGRAM_MAX_TOKENS = 20_000_000  # per source and side; the baseline needs no more precision


def split_indices(n_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) sorted document indices; eval is a seeded random ~eval_fraction of them.

  Each document draws one uniform number and the lowest ones are held out, so a larger
  eval_fraction only adds documents to eval (splits are nested), and eval gets at least one
  document (and train keeps at least one) once n_docs >= 2.
  """
  if n_docs <= 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  u = np.random.default_rng([seed, 0x5EED]).random(n_docs)
  n_eval = int(round(n_docs * eval_fraction))
  n_eval = min(max(n_eval, 1 if n_docs >= 2 else 0), n_docs - 1)
  order = np.argsort(u, kind="stable")
  return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def resolve_sources(cfg: DataConfig) -> dict[str, str]:
  """Source name -> checked token-file dir (weight-0 sources included, for eval).

  Demo mode builds the demo corpus on first use; then cfg.sources may name demo sources (with
  an empty path) to set their weights, and may add sources of the user's own.
  """
  paths: dict[str, str] = {}
  if cfg.demo:
    built = demo.build_demo_corpus(cfg.cache_dir)
    for name, src in cfg.sources.items():
      if name in built and src.path:
        raise UserError(f"data.sources.{name}.path={src.path!r}: in demo mode the demo corpus "
                        f"provides {name!r}; leave the path empty or rename the source")
    paths.update(built)
  for name, src in cfg.sources.items():
    if cfg.demo and name in demo.SOURCES:
      continue
    if not src.path:
      raise UserError(f"data.sources.{name}.path is empty: set it to a token-file directory "
                      "(written by jmid.data.tokenfile.write_token_file)")
    paths[name] = os.path.abspath(os.path.expanduser(src.path))
  for name, path in paths.items():
    try:
      tf = TokenFile(path)
    except UserError as e:
      raise UserError(f"data.sources.{name}.path: {e}") from None
    if len(tf) == 0:
      raise UserError(f"data.sources.{name}.path: {path} holds no documents; prepare it again "
                      "or remove the source")
  return paths


def source_weights(cfg: DataConfig, names: list[str] | dict[str, str]) -> dict[str, float]:
  """Mixture weight per source; demo sources not named in cfg.sources get 1 when it names none
  of them (equal mixture), else 0 (the user picked a subset)."""
  named_demo = cfg.demo and any(n in cfg.sources for n in demo.SOURCES)
  out = {}
  for name in names:
    if name in cfg.sources:
      out[name] = float(cfg.sources[name].weight)
    else:
      out[name] = 0.0 if named_demo else 1.0
  return out


def _source_seed(seed: int, name: str) -> int:
  """A per-source 32-bit seed, so sources (and grain's seed + epoch) never share a permutation."""
  return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")


def train_iterator(cfg: DataConfig, paths: dict[str, str], *, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   split_seed: int | None = None) -> grain.DatasetIterator:
  """An endless grain iterator of this process's batches (dicts of int32 [batch_size, seq_len]).

  Per source: train documents of this process's shard, shuffled afresh each epoch, split to
  fit a row and packed; sources are then interleaved row by row in proportion to their weights.
  get_state()/set_state() resume exactly; grain.checkpoint.CheckpointSave saves it in Orbax.
  """
  _check_process(process_index, process_count)
  weights = source_weights(cfg, paths)
  names = [n for n in paths if weights[n] > 0]
  if not names:
    raise UserError("data.sources: every source has weight 0; give one a positive weight")
  split_seed = seed if split_seed is None else split_seed
  rows = []
  for name in names:
    tf = TokenFile(paths[name])
    train, _ = split_indices(len(tf), cfg.eval_fraction, split_seed)
    shard = train[process_index::process_count]
    if len(shard) == 0:
      raise UserError(f"data.sources.{name}: {len(train)} training documents cannot feed "
                      f"{process_count} processes; add documents or use fewer hosts")
    rows.append(packing.packed_rows(
        tf, shard, seq_len=cfg.seq_len, packing=cfg.packing, repeat=True,
        shuffle_seed=_source_seed(seed, name) if cfg.shuffle else None))
  mixed = rows[0] if len(rows) == 1 else grain.IterDataset.mix(
      rows, [weights[n] for n in names])
  return JsonSafeIterator(iter(packing.batches(mixed, batch_size)))


def _tuple_slices(state: Any) -> Any:
  if isinstance(state, dict):
    return {k: (_tuple_slices_leaf(v) if k == "remainder_slices" else _tuple_slices(v))
            for k, v in state.items()}
  if isinstance(state, list):
    return [_tuple_slices(v) for v in state]
  return state


def _tuple_slices_leaf(slices: dict[str, Any]) -> dict[str, Any]:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in slices.items()}


class JsonSafeIterator(grain.DatasetIterator):
  """A grain iterator whose set_state accepts its own state after a JSON round trip.

  grain 0.2.18's ConcatThenSplit packer keeps `remainder_slices` as tuples and tests them with
  `!= (-1, -1)`; grain.checkpoint stores state as JSON, which makes them lists, so a restored
  run silently read one extra element and diverged from an uninterrupted one. Lists under that
  key are turned back into tuples before the state reaches grain.
  """

  def __init__(self, parent: grain.DatasetIterator) -> None:
    super().__init__(parent)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_tuple_slices(state))


def eval_batches(cfg: DataConfig, paths: dict[str, str], *, batch_size: int, n_batches: int,
                 seed: int, process_index: int = 0, process_count: int = 1
                 ) -> dict[str, list[dict[str, np.ndarray]]]:
  """Per source, n_batches fixed batches of its held-out documents, in document order.

  The held-out documents are re-read from the start only if one pass cannot fill n_batches,
  so every call returns the same batches and every process the same number of them. A process
  whose shard is empty (fewer held-out documents than processes) reads the whole eval set; a
  source with no held-out document (a single document) gets an empty list.
  """
  _check_process(process_index, process_count)
  out: dict[str, list[dict[str, np.ndarray]]] = {}
  for name, path in paths.items():
    tf = TokenFile(path)
    _, held = split_indices(len(tf), cfg.eval_fraction, seed)
    shard = held[process_index::process_count]
    if len(shard) == 0:
      shard = held
    if len(shard) == 0:
      out[name] = []
      continue
    rows = packing.packed_rows(tf, shard, seq_len=cfg.seq_len, packing=cfg.packing,
                               shuffle_seed=None, repeat=True)
    it = iter(packing.batches(rows, batch_size))
    out[name] = [next(it) for _ in range(n_batches)]
  return out


def _gather(tf: TokenFile, indices: np.ndarray, max_tokens: int) -> np.ndarray:
  """The tokens of `indices` in order, stopping after the document that passes max_tokens."""
  offsets = np.asarray(tf.offsets)
  parts, n = [], 0
  for i in indices:
    start, stop = int(offsets[i]), int(offsets[i + 1])
    parts.append(tf.tokens[start:stop])
    n += stop - start
    if n >= max_tokens:
      break
  return np.concatenate(parts) if parts else np.zeros(0, tf.dtype)


def unigram_loss(paths: dict[str, str], eval_fraction: float, seed: int, vocab_size: int) -> float:
  """Cross-entropy (nats/token) of the held-out tokens under the add-one unigram of the train
  tokens, all sources pooled: the loss of a model that learned only token frequencies.

  Large sources are estimated from a seeded sample of UNIGRAM_MAX_TOKENS tokens per side.
  """
  train_counts = np.zeros(vocab_size, np.int64)
  eval_counts = np.zeros(vocab_size, np.int64)
  for name, path in paths.items():
    tf = TokenFile(path)
    if tf.vocab_size > vocab_size:
      raise UserError(f"data.sources.{name}: token file vocab_size={tf.vocab_size} exceeds "
                      f"model.vocab_size={vocab_size}; use a matching tokenizer or model")
    train, held = split_indices(len(tf), eval_fraction, seed)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for idx, counts in ((train, train_counts), (held, eval_counts)):
      tokens = _gather(tf, rng.permutation(idx), UNIGRAM_MAX_TOKENS)
      counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
  if eval_counts.sum() == 0:
    raise UserError("no held-out tokens: every source has a single document; add documents")
  logp = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
  return float(-(eval_counts * logp).sum() / eval_counts.sum())
