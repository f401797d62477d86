"""The data the trainer sees: opened sources, a checkpointable scheduled-mixture iterator, fixed
per-source eval batches, bytes per token (for bits-per-byte) and the unigram baseline.

How the trainer uses it:
  srcs = open_sources(cfg.data)                   # tokenizer + every source, checked once
  it = train_iterator(cfg.data, srcs, batch_size=per_process_batch, seed=cfg.run.seed,
                      process_index=..., process_count=...)
  evals = eval_batches(cfg.data, srcs, batch_size=..., n_batches=..., seed=cfg.run.seed)

A source held out by split (no eval_path) loses a seeded ~eval_fraction of its documents to
eval; `seed` (run.seed) picks that split, so keep it fixed across the stages of one lineage or
documents held out in one stage may be trained on in the next. It also picks the document order
unless data.shuffle_seed is set: a stage branched from a run sets its own, not to re-read the
documents that run read first. Sources whose weight
is 0 all along still get eval batches, so a run can watch what it does not train on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from typing import Any

import grain
import numpy as np

from jmid import fs
from jmid.config import DataConfig, SourceConfig
from jmid.errors import UserError
from jmid.data import demo, mirror, mixture, packing, sources
from jmid.data.tokenizer import Tokenizer, load_tokenizer

UNIGRAM_MAX_TOKENS = 2_000_000  # per source and side; the baseline needs no more precision
BYTES_SAMPLE_DOCS = 2_000  # held-out documents measured for bytes per token
COUNT_CHUNK = 1 << 20  # document lengths read per step when counting tokens


@dataclasses.dataclass
class Sources:
  """Every configured source, opened; `eval` holds explicit eval sets (eval_path) only."""

  tokenizer: Tokenizer
  specs: dict[str, SourceConfig]
  train: dict[str, Any]
  eval: dict[str, Any]

  @property
  def names(self) -> list[str]:
    return list(self.specs)


def source_specs(cfg: DataConfig) -> dict[str, SourceConfig]:
  """The configured sources; demo mode adds the demo corpus (named demo sources set weights)
  and builds an optional demo source (demo.OPTIONAL) that a config names with an empty path."""
  specs: dict[str, SourceConfig] = {}
  if cfg.demo:
    built = demo.build_demo_corpus(cfg.cache_dir)
    named = [n for n in cfg.sources if n in built]
    for name, path in built.items():
      user = cfg.sources.get(name)
      if user is not None and user.path:
        raise UserError(f"data.sources.{name}.path={user.path!r}: in demo mode the demo corpus "
                        f"provides {name!r}; leave the path empty or rename the source")
      weight = user.weight if user else (0.0 if named else demo.DEFAULT_WEIGHTS[name])
      specs[name] = SourceConfig(path=path, weight=weight, format="tokens",
                                 kind=demo.KINDS[name])
  for name, spec in cfg.sources.items():
    if name in specs:
      continue
    if cfg.demo and name in demo.OPTIONAL and not spec.path:
      spec = dataclasses.replace(spec, path=demo.build_optional(name, cfg.cache_dir),
                                 format="tokens", kind=demo.KINDS[name])
    elif not spec.path:
      raise UserError(f"data.sources.{name}.path is empty: set it to a file, directory or glob")
    specs[name] = _local(spec, f"data.sources.{name}", cfg.cache_dir)
  return specs


def _local(spec: SourceConfig, key: str, cache_dir: str) -> SourceConfig:
  """A source in a gs:// bucket as its local copy (jmid/data/mirror.py); the config keeps
  the bucket path, so a resume compares what the user wrote."""
  for field in ("path", "eval_path"):
    value = getattr(spec, field)
    fs.check_scheme(value, f"{key}.{field}")
    if fs.is_remote(value):
      spec = dataclasses.replace(spec, **{field: mirror.local_copy(f"{key}.{field}", value,
                                                                   cache_dir)})
  return spec


def open_sources(cfg: DataConfig) -> Sources:
  tok = load_tokenizer(cfg.tokenizer)
  specs = source_specs(cfg)
  train = {n: _open(cfg, n, s, tok) for n, s in specs.items()}
  evals = {n: sources.open_source(n, s, tok, eval=True) for n, s in specs.items() if s.eval_path}
  for name, src in list(train.items()) + [(f"{n} (eval_path)", s) for n, s in evals.items()]:
    if len(src) == 0:
      raise UserError(f"data.sources.{name.split()[0]}: no documents; prepare it again or "
                      "remove the source")
  return Sources(tok, specs, train, evals)


def _open(cfg: DataConfig, name: str, spec: SourceConfig, tok: Tokenizer) -> Any:
  """sources.open_source; a damaged demo corpus says how to rebuild it (delete the cache)."""
  try:
    return sources.open_source(name, spec, tok)
  except UserError as e:
    root = os.path.join(os.path.abspath(os.path.expanduser(cfg.cache_dir)), demo.VERSION)
    if not cfg.demo or not spec.path.startswith(root + os.sep):
      raise
    raise UserError(f"{e}; this is the demo corpus: delete {root} and run again to rebuild "
                    "it") from None


def check_vocab(srcs: Sources, vocab_size: int) -> None:
  """Token ids must index the model's embedding table."""
  if srcs.tokenizer.vocab_size > vocab_size:
    raise UserError(f"data.tokenizer has {srcs.tokenizer.vocab_size} tokens but "
                    f"model.vocab_size={vocab_size}; raise model.vocab_size or change tokenizer")
  for name, src in srcs.train.items():
    top = src.max_token_id()
    if top >= vocab_size:
      raise UserError(f"data.sources.{name}: holds token id {top} >= model.vocab_size="
                      f"{vocab_size}; it was tokenized for a larger vocabulary")


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


def _splits(srcs: Sources, name: str, eval_fraction: float,
            seed: int) -> tuple[np.ndarray, tuple[Any, np.ndarray]]:
  """(train indices, (eval source, eval indices)) for one source."""
  src = srcs.train[name]
  if name in srcs.eval:
    return np.arange(len(src)), (srcs.eval[name], np.arange(len(srcs.eval[name])))
  train, held = split_indices(len(src), eval_fraction, seed)
  return train, (src, held)


def packing_for(cfg: DataConfig, spec: SourceConfig) -> str:
  """Chat examples are packed first-fit so each stays whole in one row (when it fits);
  text follows data.packing."""
  return "first_fit" if spec.kind == "chat" else cfg.packing


def _source_seed(seed: int, name: str) -> int:
  """A per-source 32-bit seed, so sources (and grain's seed + epoch) never share a permutation."""
  return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")


def schedule(cfg: DataConfig, srcs: Sources) -> mixture.Schedule:
  """data.mixture when given, else the constant source weights."""
  stages = cfg.mixture or ((0, {n: s.weight for n, s in srcs.specs.items()}),)
  if not any(sum(w.values()) > 0 for _, w in stages):
    raise UserError("data.sources: every source has weight 0; give one a positive weight")
  return mixture.Schedule(srcs.names, stages, cfg.mixture_interpolation)


def train_iterator(cfg: DataConfig, srcs: Sources, *, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An endless iterator of this process's batches: dicts of int32 [batch_size, seq_len] plus
  `source` [batch_size] (which source each row came from).

  Per source: train documents of this process's shard, shuffled afresh each epoch, split to fit
  a row and packed; rows are then drawn by the mixture schedule (one step = batch_size rows).
  `seed` picks the eval split; the order and the draws use cfg.shuffle_seed when it is set.
  """
  _check_process(process_index, process_count)
  sched = schedule(cfg, srcs)
  _check_memory(cfg, list(srcs.specs.values()), batch_size)
  order = seed if cfg.shuffle_seed == -1 else cfg.shuffle_seed
  rows = []
  for name in srcs.names:
    train, _ = _splits(srcs, name, cfg.eval_fraction, seed)
    shard = train[process_index::process_count]
    if len(shard) == 0:
      raise UserError(f"data.sources.{name}: {len(train)} training documents cannot feed "
                      f"{process_count} processes; add documents or use fewer hosts")
    if count_tokens(srcs.train[name], shard, 1) == 0:  # the packer would wait forever
      raise UserError(f"data.sources.{name}: the {len(shard)} training documents of process "
                      f"{process_index} are all empty; prepare the source again")
    rows.append(packing.packed_rows(
        srcs.train[name], shard, seq_len=cfg.seq_len, packing=packing_for(cfg, srcs.specs[name]),
        repeat=True,
        shuffle_seed=_source_seed(order, name) if cfg.shuffle else None))
  mixed = mixture.ScheduledMixIterDataset(rows, sched, batch_size, order)
  return JsonSafeIterator(iter(packing.batches(mixed, batch_size)))


def _tuple_slices(state: Any) -> Any:
  if isinstance(state, dict):
    return {k: ({f: tuple(v) if isinstance(v, list) else v for f, v in s.items()}
                if k == "remainder_slices" else _tuple_slices(s)) for k, s in state.items()}
  if isinstance(state, list):
    return [_tuple_slices(v) for v in state]
  return state


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


def eval_batches(cfg: DataConfig, srcs: Sources, *, batch_size: int, n_batches: int,
                 seed: int, process_index: int = 0, process_count: int = 1
                 ) -> dict[str, list[dict[str, np.ndarray]]]:
  """Per source, up to n_batches fixed batches of its held-out documents, in document order.

  Never more batches than one pass over the source's whole held-out set fills (but at least 1):
  eval_batch_count says how many, from the global held-out tokens, so every process gets the
  same number; `len(result[name])` is that number. A process's shard is re-read from the start
  when it runs out first, and a process whose shard is empty (fewer held-out documents than
  processes) reads the whole eval set. A source with no held-out token gets an empty list.
  """
  _check_process(process_index, process_count)
  out: dict[str, list[dict[str, np.ndarray]]] = {}
  for name in srcs.names:
    _, (src, held) = _splits(srcs, name, cfg.eval_fraction, seed)
    n = eval_batch_count(cfg, src, held, batch_size * process_count, n_batches)
    shard = held[process_index::process_count]
    if count_tokens(src, shard, 1) == 0:
      shard = held
    if n == 0:
      out[name] = []
      continue
    _check_memory(cfg, [srcs.specs[name]], batch_size)
    rows = packing.packed_rows(src, shard, seq_len=cfg.seq_len,
                               packing=packing_for(cfg, srcs.specs[name]), shuffle_seed=None,
                               repeat=True)
    it = iter(packing.batches(rows, batch_size))
    out[name] = [next(it) for _ in range(n)]
  return out


def eval_batch_count(cfg: DataConfig, src: Any, held: np.ndarray, global_batch: int,
                     n_batches: int) -> int:
  """min(n_batches, the batches of global_batch rows one pass over `held` surely fills (a row
  holds at most seq_len + 1 tokens), at least 1); 0 when `held` has no token."""
  row_tokens = global_batch * (cfg.seq_len + 1)
  total = count_tokens(src, held, n_batches * row_tokens)
  if total == 0:
    return 0
  return min(n_batches, max(1, total // row_tokens))


def count_tokens(src: Any, indices: np.ndarray, enough: int) -> int:
  """Tokens in the documents `indices`, counted until there are `enough`: token files read
  their offsets only; other sources read documents (each holds at least its EOS)."""
  n = 0
  if hasattr(src, "doc_lengths"):
    for lo in range(0, len(indices), COUNT_CHUNK):
      n += int(src.doc_lengths(indices[lo:lo + COUNT_CHUNK]).sum())
      if n >= enough:
        break
    return n
  for i in indices:
    n += len(src[int(i)]["tokens"])
    if n >= enough:
      break
  return n


def host_bytes(cfg: DataConfig, specs: list[SourceConfig], batch_size: int) -> int:
  """A low estimate of the host memory the pipeline's seq_len-long buffers take: grain's packer
  per source (first-fit keeps FIRST_FIT_BINS rows of 3 int32 arrays per feature; concat about
  7 such arrays) and a batch in flight (its packed rows, then 5 int32 arrays per row)."""
  per_source = sum(packing.FIRST_FIT_BINS * 6 * 4 if packing_for(cfg, s) == "first_fit"
                   else 7 * 4 for s in specs)
  return (cfg.seq_len + 1) * (per_source + batch_size * 11 * 4)


def _check_memory(cfg: DataConfig, specs: list[SourceConfig], batch_size: int) -> None:
  """One line instead of a MemoryError (or the kernel's OOM killer, which prints nothing) when
  the buffers alone cannot fit in the host's available memory."""
  need, have = host_bytes(cfg, specs, batch_size), _available_bytes()
  if have and need > have:
    raise UserError(
        f"data.seq_len={cfg.seq_len}: the data pipeline alone needs about {need / 2**30:,.1f} "
        f"GiB of host memory ({len(specs)} source(s) packed into rows of seq_len + 1 tokens, "
        f"{batch_size} rows per batch), more than the {have / 2**30:,.1f} GiB available; use a "
        "smaller data.seq_len or train.global_batch")


def _available_bytes() -> int:
  """MemAvailable from /proc/meminfo; 0 (unknown) elsewhere."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return 0


def bytes_per_token(cfg: DataConfig, srcs: Sources, seed: int) -> dict[str, float]:
  """UTF-8 bytes per token of each source's held-out documents: eval loss in nats/token
  divided by (ln 2 * this) is bits per byte, comparable across tokenizers."""
  out = {}
  for name in srcs.names:
    _, (src, held) = _splits(srcs, name, cfg.eval_fraction, seed)
    n_bytes = n_tokens = 0
    for i in held[:BYTES_SAMPLE_DOCS]:
      n_bytes += src.num_bytes(int(i))
      n_tokens += len(src[int(i)]["tokens"])
    out[name] = n_bytes / n_tokens if n_tokens else math.nan
  return out


def _gather(src: Any, indices: np.ndarray, max_tokens: int) -> np.ndarray:
  """The tokens of `indices` in order, stopping after the document that passes max_tokens."""
  parts, n = [], 0
  for i in indices:
    tokens = src[int(i)]["tokens"]
    parts.append(tokens)
    n += len(tokens)
    if n >= max_tokens:
      break
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def unigram_loss(cfg: DataConfig, srcs: Sources, seed: int, vocab_size: int) -> float:
  """Cross-entropy (nats/token) of the held-out tokens under the add-one unigram of the train
  tokens, all sources pooled: the loss of a model that learned only token frequencies.

  Large sources are estimated from a seeded sample of UNIGRAM_MAX_TOKENS tokens per side.
  """
  train_counts = np.zeros(vocab_size, np.int64)
  eval_counts = np.zeros(vocab_size, np.int64)
  empty = []  # sources whose held-out documents hold no token
  for name in srcs.names:
    train, (src, held) = _splits(srcs, name, cfg.eval_fraction, seed)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for s, idx, counts in ((srcs.train[name], train, train_counts), (src, held, eval_counts)):
      tokens = _gather(s, rng.permutation(idx), UNIGRAM_MAX_TOKENS)
      counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
      if counts is eval_counts and len(idx) and not len(tokens):
        empty.append(f"data.sources.{name} ({len(idx)})")
  if eval_counts.sum() == 0 and empty:
    raise UserError(f"no held-out tokens: the held-out documents of {', '.join(empty)} are all "
                    "empty, which no prepared file holds; rebuild the source with python -m "
                    "jmid.data.prepare")
  if eval_counts.sum() == 0:
    raise UserError("no held-out tokens: every source has a single document; add documents")
  logp = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
  return float(-(eval_counts * logp).sum() / eval_counts.sum())
