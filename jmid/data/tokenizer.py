"""Tokenizers behind one small interface: the built-in byte tokenizer and Hugging Face
tokenizer.json files.

`encode` never adds special tokens and never turns special-token text inside a document (a
literal "<|endoftext|>" in a web page) into the special id: documents are text, and only the
pipeline decides where EOS and chat markers go.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jmid.errors import UserError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>",
                  "<｜end▁of▁sentence｜>")  # the last is DeepSeek's (full-width bars)
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>",
                  "<｜begin▁of▁sentence｜>")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  vocab_size: int
  eos_id: int
  bos_id: int | None

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of `text`, no special tokens added."""
    ...

  def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special: bool = False) -> str:
    """Text of `ids`; special tokens are written out unless skip_special."""
    ...

  def token_to_id(self, s: str) -> int | None:
    """The id of `s` if it is a single token of the vocabulary, else None."""
    ...


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
  return np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; 256 ends a document and 257 may start one."""

  EOS = 256
  BOS = 257
  vocab_size = 258
  eos_id = EOS
  bos_id: int | None = BOS

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of the UTF-8 bytes of `text` (no specials added)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special: bool = False) -> str:
    """Text of the byte ids. EOS/BOS have no bytes, so they are always dropped (skip_special
    changes nothing); broken UTF-8 becomes U+FFFD."""
    arr = _as_ids(ids)
    arr = arr[(arr >= 0) & (arr < 256)]
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def token_to_id(self, s: str) -> int | None:
    b = s.encode("utf-8")
    return b[0] if len(b) == 1 else None

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json.

  Only the path is pickled: grain workers and prepare's worker processes load the file
  themselves (a pickled `tokenizers.Tokenizer` also forgets `encode_special_tokens`).
  """

  def __init__(self, path: str, key: str = "data.tokenizer") -> None:
    self.path = os.path.abspath(os.path.expanduser(path))
    self.key = key  # how errors name the setting (prepare says --tokenizer)
    self._tok: Any = None
    tok = self._load()
    vocab = tok.get_vocab(with_added_tokens=True)
    # Ids need not be contiguous (added tokens may sit past the model's vocabulary).
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0
    eos = next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None),
               None)
    if eos is None:
      raise UserError(f"{key}={path!r}: the tokenizer has no EOS token (none of "
                      f"{', '.join(EOS_CANDIDATES)}); add one to its added_tokens")
    self.eos_id: int = int(eos)
    bos = next((tok.token_to_id(t) for t in BOS_CANDIDATES if tok.token_to_id(t) is not None),
               None)
    self.bos_id: int | None = None if bos is None else int(bos)

  def _load(self) -> Any:
    if self._tok is None:
      try:
        import tokenizers
      except ImportError:
        raise UserError(f"{self.key}: the 'tokenizers' package is missing; "
                        "pip install tokenizers") from None
      try:
        tok = tokenizers.Tokenizer.from_file(self.path)
      except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{self.key}={self.path!r} is not a valid tokenizer.json ({msg}); "
                        "point it at the tokenizer.json of a Hugging Face model") from None
      tok.encode_special_tokens = True  # special-token text in documents stays text
      tok.no_truncation()
      tok.no_padding()
      self._tok = tok
    return self._tok

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._load().encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Many texts at once: one call into Rust instead of one per text."""
    tok = self._load()
    fn = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets
    return [np.asarray(e.ids, dtype=np.int32) for e in fn(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special: bool = False) -> str:
    return self._load().decode(_as_ids(ids).tolist(), skip_special_tokens=skip_special)

  def token_to_id(self, s: str) -> int | None:
    i = self._load().token_to_id(s)
    return None if i is None else int(i)

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state["_tok"] = None
    return state

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(spec: str, key: str = "data.tokenizer") -> Tokenizer:
  """'byte' -> ByteTokenizer; else a tokenizer.json path (or a folder holding one).

  `key` is how errors name the setting.
  """
  if spec == "byte":
    return ByteTokenizer()
  if not spec:
    raise UserError(f"{key} is empty: set it to 'byte' or to a tokenizer.json path")
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise UserError(f"{key}={spec!r}: no such file {path}; set it to 'byte' or to "
                    "the tokenizer.json of a Hugging Face model")
  return HFTokenizer(path, key)
