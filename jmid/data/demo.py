"""The built-in demo corpus: four real-looking sources from what every Python install has.

"code" is standard-library source files, "text" is English prose (docstrings of the other
stdlib files and the pydoc topic pages, read with `ast`, nothing is imported), "math" is
seeded arithmetic word problems with worked answers, "chat" is seeded tutoring conversations
(ChatML, with a loss mask that leaves system and user turns out). No download; the same Python version
gives the same bytes. Code and text come from disjoint files, so text held out for eval never
appears verbatim in the code a model trains on.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from jmid.errors import UserError
from jmid.data import atomic, tokenfile
from jmid.data.mathgen import chat_conversations, math_documents
from jmid.data.chat import render_chat
from jmid.data.retrieval import filler_sentences, retrieval_documents
from jmid.data.tokenizer import ByteTokenizer

VERSION = "demo-v2"
SOURCES = ("code", "math", "text", "chat")
KINDS = {"code": "text", "math": "text", "text": "text", "chat": "chat", "retrieval": "chat"}
RETRIEVAL_DOCS = 8000  # 64-1000 tokens each: passkeys in plain generated sentences
# Weights when a config names no demo source: pretraining data; chat joins in mid-training.
DEFAULT_WEIGHTS = {"code": 1.0, "math": 1.0, "text": 1.0, "chat": 0.0}
CHAT_BYTES = 1_500_000
CODE_BYTES = 3_500_000  # stdlib source (by a hash of the path) until this budget; rest -> text
MATH_BYTES = 3_000_000
MIN_DOCSTRING = 40  # characters; shorter docstrings are one-line labels, not prose
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_TOPICS = os.path.join("pydoc_data", "topics.py")


def build_demo_corpus(cache_dir: str) -> dict[str, str]:
  """Returns {"code", "math", "text", "chat"} -> token-file dirs, building them on first use.

  A file lock makes concurrent callers wait for one builder; the build itself lands by a single
  directory rename, so a killed build never leaves a corpus that looks finished, and a failed
  one (a full or read-only data.cache_dir: one line naming it) leaves no temp folder.
  """
  cache = os.path.abspath(os.path.expanduser(cache_dir))
  root = os.path.join(cache, VERSION)
  paths = {name: os.path.join(root, name) for name in SOURCES}
  if _complete(paths):
    return paths
  with atomic.naming(f"data.cache_dir={cache_dir}", cache):
    atomic.make_parents(cache)  # kept on failure: the lock file lives there
    with _file_lock(root + ".lock"):
      if _complete(paths):
        return paths
      if os.path.exists(root):
        raise UserError(f"{root} exists but is incomplete; delete it and run again to rebuild "
                        "the demo corpus")
      _build(cache, root, paths)
  return paths


def build_optional(name: str, cache_dir: str) -> str:
  """The token-file dir of optional demo source `name` (one of OPTIONAL), built on first use
  (under the corpus lock, in a temp sibling renamed into place, like the corpus)."""
  cache = os.path.abspath(os.path.expanduser(cache_dir))
  path = os.path.join(cache, f"{VERSION}-{name}")
  if os.path.isfile(os.path.join(path, "meta.json")):
    return path
  with atomic.naming(f"data.cache_dir={cache_dir}", cache):
    atomic.make_parents(cache)
    with _file_lock(os.path.join(cache, VERSION + ".lock")):
      if not os.path.isfile(os.path.join(path, "meta.json")):
        if os.path.exists(path):  # not ours: the token file lands by one rename, meta included
          raise UserError(f"{path} exists but is incomplete; delete it and run again to rebuild "
                          f"the demo source {name!r}")
        tokenfile.write_token_file(path, OPTIONAL[name](), ByteTokenizer.vocab_size)
  return path


def _retrieval_documents() -> Iterator[tuple[np.ndarray, np.ndarray]]:
  return retrieval_documents(ByteTokenizer(), filler_sentences(seed=7), seed=8,
                             n_docs=RETRIEVAL_DOCS, min_tokens=64, max_tokens=1000)


# Sources built on first use by a config that names them (data.sources.<name> with an empty
# path), so other demo runs neither build nor evaluate them: name -> its documents.
OPTIONAL: dict[str, Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]] = {
    "retrieval": _retrieval_documents}


def _build(cache: str, root: str, paths: dict[str, str]) -> None:
  """Writes the corpus into a temp folder in `cache` and renames it to `root`; the temp folder
  is removed whatever happens (a full disk, Ctrl-C)."""
  tmp = tempfile.mkdtemp(prefix=VERSION + ".tmp-", dir=cache)
  try:
    code_files, text_files = _split_stdlib_files()
    vocab = ByteTokenizer.vocab_size
    tokenfile.write_token_file(os.path.join(tmp, "code"), _code_documents(code_files), vocab)
    tokenfile.write_token_file(os.path.join(tmp, "math"), _math_tokens(), vocab)
    tokenfile.write_token_file(os.path.join(tmp, "text"), _text_documents(text_files), vocab)
    _write_chat(os.path.join(tmp, "chat"))
    try:
      os.rename(tmp, root)
    except OSError:
      if not _complete(paths):  # a builder without the lock (no fcntl) may have won
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _complete(paths: dict[str, str]) -> bool:
  return all(os.path.isfile(os.path.join(p, "meta.json")) for p in paths.values())


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """An exclusive advisory lock (no-op where fcntl is missing; the rename still protects)."""
  try:
    import fcntl
  except ImportError:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def stdlib_files() -> list[str]:
  """Relative paths of the stdlib's own .py files (no tests, no third-party packages), sorted."""
  root = os.path.dirname(os.__file__)
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("config-"))
    for f in sorted(files):
      if f.endswith(".py") and not f.startswith("_sysconfigdata"):
        out.append(os.path.relpath(os.path.join(d, f), root))
  return sorted(out)


def _split_stdlib_files() -> tuple[list[str], list[str]]:
  """Code files: a path-hash-ordered prefix within CODE_BYTES; text files: the rest.

  Ordering by a hash of the path spreads the code across the whole stdlib (not just a-c).
  """
  root = os.path.dirname(os.__file__)
  files = [f for f in stdlib_files() if f != _TOPICS]
  code, used = [], 0
  for rel in sorted(files, key=lambda r: (zlib.crc32(r.encode()), r)):
    size = os.path.getsize(os.path.join(root, rel))
    if used + size <= CODE_BYTES:
      code.append(rel)
      used += size
  chosen = set(code)
  return sorted(code), [f for f in files if f not in chosen] + [_TOPICS]


def _with_eos(data: bytes) -> np.ndarray:
  out = np.empty(len(data) + 1, np.uint16)
  out[:-1] = np.frombuffer(data, np.uint8)
  out[-1] = ByteTokenizer.EOS
  return out


def _code_documents(files: list[str]) -> Iterator[np.ndarray]:
  """One document per source file: its raw bytes (UTF-8 source) then EOS."""
  root = os.path.dirname(os.__file__)
  for rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      yield _with_eos(f.read())


def _parse(src: bytes) -> ast.Module:
  """ast.parse with the cyclic collector paused: on CPython 3.11 a finalizer it runs mid-parse
  that itself parses (any traceback printed, e.g. by asyncio for a freed task) crashes the
  outer parse with "AST constructor recursion depth mismatch"."""
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    return ast.parse(src)
  finally:
    if was_enabled:
      gc.enable()


def _text_documents(files: list[str]) -> Iterator[np.ndarray]:
  """One document per docstring (module, class, function) and per pydoc topic page."""
  root = os.path.dirname(os.__file__)
  for rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      src = f.read()
    try:
      tree = _parse(src)
    except (SyntaxError, ValueError):
      continue
    if rel == _TOPICS:
      for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
          for v in node.values:
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
              yield _with_eos(v.value.strip().encode("utf-8"))
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= MIN_DOCSTRING:
          yield _with_eos(doc.encode("utf-8"))


def _math_tokens() -> Iterator[np.ndarray]:
  for text in math_documents(seed=0, n_bytes=MATH_BYTES):
    yield _with_eos(text.encode("utf-8"))


def _write_chat(path: str) -> None:
  """Tutoring conversations rendered with the chat template; the mask trains only the tutor."""
  tok = ByteTokenizer()
  rendered = (render_chat(m, tok) for m in chat_conversations(seed=1, n_bytes=CHAT_BYTES))
  tokenfile.write_token_file(path, rendered, ByteTokenizer.vocab_size)
