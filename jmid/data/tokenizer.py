"""A byte-level tokenizer: needs no vocabulary file, so the demo runs anywhere offline."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; 256 ends a document and 257 may start one."""

  EOS = 256
  BOS = 257
  vocab_size = 258

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of the UTF-8 bytes of `text` (no specials added)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of the byte ids; specials are skipped and broken UTF-8 becomes U+FFFD."""
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    arr = arr[(arr >= 0) & (arr < 256)]
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
