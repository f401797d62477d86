"""Tokenize JSONL / Parquet / plain-text files into a jmid token file, in parallel.

  python -m jmid.data.prepare --input=docs/*.jsonl[,more/*.parquet] --tokenizer=tok.json \\
      --out=data/math [--kind=text|chat] [--field=text] [--format=auto] [--workers=N]

Records are read in order, sent in chunks to worker processes and written back in the same
order, so the output is the same for any --workers. At most a few chunks are in flight, so
memory stays flat on inputs of any size (see parallel.py). The token file appears by one
rename when everything is written (meta.json last): a crash, Ctrl-C or kill leaves no
directory that looks complete.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from jmid import cli
from jmid.errors import UserError
from jmid.data import atomic, formats, parallel
from jmid.data.tokenfile import token_dtype, write_token_file
from jmid.data.tokenizer import Tokenizer, load_tokenizer

CHUNK_BYTES = 1 << 20  # raw input per task
CHUNK_RECORDS = 2048
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
              ".txt": "txt", ".text": "txt", ".md": "txt"}

Task = tuple[str, str, list[tuple[int, Any]]]  # (format, path, [(line/row, raw record)])


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> Any:  # one line and exit 2, not argparse's usage block
    raise UserError(f"{message}; see python -m jmid.data.prepare --help")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = _Parser(prog="python -m jmid.data.prepare", description=__doc__.split("\n")[0])
  p.add_argument("--input", required=True, help="comma-separated files, dirs or globs")
  p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
  p.add_argument("--out", required=True, help="the token-file directory to write")
  p.add_argument("--kind", default="text", choices=("text", "chat"))
  p.add_argument("--field", default="", help="JSON field / Parquet column ('text' or 'messages')")
  p.add_argument("--format", default="auto", choices=("auto", "jsonl", "parquet", "txt"))
  p.add_argument("--workers", type=int, default=0,
                 help="processes; 0 = 1 for the byte tokenizer (IPC costs more than the work), "
                      "else one per CPU")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = p.parse_args(argv)
  if args.workers < 0:
    raise UserError(f"--workers={args.workers}: must be >= 1, or 0 for automatic")
  if args.workers == 0:
    args.workers = 1 if args.tokenizer == "byte" else os.cpu_count() or 1
  return args


def input_files(spec: str, fmt: str) -> list[tuple[str, str]]:
  """(format, path) for every file the comma-separated globs name, in the order given."""
  out = []
  for pattern in [s for s in spec.split(",") if s]:
    for p in formats.resolve_paths("--input", pattern):
      inner = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs) \
          if os.path.isdir(p) else [p]
      for q in inner:
        f = fmt if fmt != "auto" else _format_of(q, strict=not os.path.isdir(p))
        if f:
          out.append((f, q))
  if not out:
    raise UserError(f"--input={spec}: no .jsonl/.parquet/.txt files found; pass --format")
  return out


def _format_of(path: str, strict: bool) -> str:
  base = path[:-3] if path.endswith(".gz") else path
  fmt = EXTENSIONS.get(os.path.splitext(base)[1].lower(), "")
  if strict and not fmt:
    raise UserError(f"--input: cannot tell the format of {path} from its extension; pass "
                    "--format=jsonl|parquet|txt")
  return fmt


def tasks(files: list[tuple[str, str]], field: str, kind: str) -> Iterator[Task]:
  """Chunks of raw records, in input order."""
  for fmt, path in files:
    if fmt == "txt":
      if kind == "chat":
        raise UserError(f"{path}: --kind=chat needs jsonl or parquet input, not plain text")
      with open(path, "rb") as f:
        yield fmt, path, [(0, f.read())]
      continue
    chunk: list[tuple[int, Any]] = []
    size = 0
    if fmt == "jsonl":
      records: Iterator[tuple[int, Any]] = formats.iter_jsonl(path)
    else:
      records = _parquet_rows(path, field, kind)
    for where, raw in records:
      chunk.append((where, raw))
      size += len(raw) if isinstance(raw, (bytes, str)) else 256
      if size >= CHUNK_BYTES or len(chunk) >= CHUNK_RECORDS:
        yield fmt, path, chunk
        chunk, size = [], 0
    if chunk:
      yield fmt, path, chunk


def _parquet_rows(path: str, field: str, kind: str) -> Iterator[tuple[int, Any]]:
  row = 0
  for values in formats.iter_parquet(path, field, kind):
    for v in values:
      yield row, v
      row += 1


_TOK: Tokenizer | None = None
_CFG: tuple[str, str] = ("text", "text")


def _init_worker(tokenizer: str, kind: str, field: str) -> None:
  """Loads the tokenizer once per process."""
  global _TOK, _CFG
  if multiprocessing.parent_process() is not None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # in a worker: the processes are the threads
  _TOK = load_tokenizer(tokenizer, "--tokenizer")
  _CFG = (kind, field)


Result = tuple[list[tuple[np.ndarray, np.ndarray | None]], int]


def work(task: Task) -> Result:
  """Tokenizes one chunk: ([(tokens, chat mask as uint8 or None)], UTF-8 bytes of its text)."""
  tok, (kind, field) = _TOK, _CFG
  assert tok is not None
  fmt, path, items = task
  values = []
  for where, raw in items:
    at = f"{path}:{where}" if fmt == "jsonl" else f"{path} row {where}" if fmt == "parquet" \
        else path
    if fmt == "jsonl":
      values.append(formats.parse_json_line(raw, field, kind, at))
    elif fmt == "parquet":
      values.append(formats.check_value(raw, field, kind, at))
    else:
      try:
        values.append(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
  dtype = token_dtype(tok.vocab_size)
  out: list[tuple[np.ndarray, np.ndarray | None]] = []
  n_bytes = 0
  if kind == "text":
    encode_batch = getattr(tok, "encode_batch", None)
    ids = encode_batch(values) if encode_batch else [tok.encode(v) for v in values]
    for v, t in zip(values, ids):
      out.append((np.append(t, tok.eos_id).astype(dtype), None))
      n_bytes += len(v.encode("utf-8"))
  else:
    for v in values:
      tokens, mask = formats.tokenize_value(v, kind, tok, path)
      out.append((tokens.astype(dtype), mask.astype(np.uint8)))
      n_bytes += formats.text_bytes(v, kind, tokens, tok)
  return out, n_bytes


class Progress:
  """A status line on stderr: rewritten in place on a terminal, every 30 s otherwise."""

  def __init__(self) -> None:
    self.t0 = self.last = time.perf_counter()
    self.docs = self.tokens = self.bytes = 0
    self.tty = sys.stderr.isatty()
    self.shown = False

  def line(self) -> str:
    dt = max(time.perf_counter() - self.t0, 1e-9)
    return (f"prepare: {self.docs:,} docs | {self.tokens / 1e6:,.2f}M tokens | "
            f"{self.bytes / 1e6 / dt:,.1f} MB/s | {self.tokens / dt / 1e6:,.2f}M tokens/s | "
            f"{dt:,.0f}s")

  def update(self, docs: int, tokens: int, n_bytes: int) -> None:
    self.docs += docs
    self.tokens += tokens
    self.bytes += n_bytes
    now = time.perf_counter()
    if now - self.last >= (0.2 if self.tty else 30.0):
      self.last = now
      sys.stderr.write(f"\r{self.line()}\033[K" if self.tty else self.line() + "\n")
      sys.stderr.flush()
      self.shown = self.tty

  def end(self) -> None:
    if self.shown:
      sys.stderr.write("\n")
      self.shown = False


def prepare(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
  """Runs the whole job; returns the written token file's meta."""
  out = os.path.abspath(os.path.expanduser(args.out))
  if os.path.exists(out) and not args.overwrite:
    raise UserError(f"--out={args.out} already exists; pass --overwrite or pick a new directory")
  files = input_files(args.input, args.format)
  tok = load_tokenizer(args.tokenizer, "--tokenizer")
  field = formats.default_field(args.kind, args.field)
  spec = "byte" if args.tokenizer == "byte" else getattr(tok, "path", args.tokenizer)
  chat = args.kind == "chat"

  def docs() -> Iterator[Any]:
    for results, n_bytes in parallel.ordered_map(work, tasks(files, field, args.kind),
                                                 args.workers, _init_worker,
                                                 (spec, args.kind, field)):
      progress.update(len(results), sum(len(t) for t, _ in results), n_bytes)
      for tokens, mask in results:
        yield (tokens, mask) if chat else tokens
    if progress.docs == 0:
      raise UserError(f"--input={args.input}: the files hold no documents")

  with atomic.naming(f"--out={args.out}", out):  # a full or read-only --out: one line
    return write_token_file(out, docs(), tok.vocab_size, overwrite=args.overwrite,
                            extra_meta={"tokenizer": spec, "eos_id": int(tok.eos_id),
                                        "kind": args.kind, "field": field})


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  progress = Progress()
  try:
    args = parse_args(argv)
    meta = prepare(args, progress)
  finally:
    progress.end()
  dt = max(time.perf_counter() - progress.t0, 1e-9)
  mask = ", with loss mask" if meta["has_mask"] else ""
  print(f"wrote {os.path.abspath(args.out)}: {meta['n_docs']:,} documents, "
        f"{meta['n_tokens']:,} tokens ({meta['dtype']}{mask}) from "
        f"{progress.bytes / 1e6:,.1f} MB of text in {dt:,.1f}s: "
        f"{meta['n_tokens'] / dt:,.0f} tokens/s, {progress.bytes / 1e6 / dt:,.1f} MB/s")
  return 0


if __name__ == "__main__":
  signal.signal(signal.SIGINT, parallel.on_signal)
  signal.signal(signal.SIGTERM, parallel.on_signal)
  sys.exit(main())
