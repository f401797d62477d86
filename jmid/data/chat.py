"""Chat conversations -> tokens plus a loss mask, so mid-training on chat data learns to answer
without learning to imitate the user.

The template is ChatML, one block per message: "<|im_start|>{role}\\n{content}<|im_end|>\\n",
then EOS. <|im_start|> and <|im_end|> are single ids where the tokenizer has them, else text.
Each piece is encoded on its own, so mask boundaries fall exactly on piece boundaries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jmid.errors import UserError
from jmid.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _marker(tok: Tokenizer, s: str) -> np.ndarray:
  i = tok.token_to_id(s)
  return np.array([i], np.int32) if i is not None and len(s) > 1 else tok.encode(s)


def validate_messages(messages: Any, where: str = "") -> list[dict[str, str]]:
  """The messages, checked: a non-empty list of {role, content} with at least one assistant."""
  at = f"{where}: " if where else ""
  fix = ("expected a list of {'role': 'system'|'user'|'assistant', 'content': str} with at "
         "least one assistant message")
  if not isinstance(messages, (list, tuple)) or not messages:
    raise UserError(f"{at}chat messages must be a non-empty list, got "
                    f"{type(messages).__name__ if messages is not None else 'null'}; {fix}")
  for j, m in enumerate(messages):
    if not isinstance(m, dict):
      raise UserError(f"{at}message {j} is a {type(m).__name__}, not an object; {fix}")
    if m.get("role") not in ROLES:
      raise UserError(f"{at}message {j} has role {m.get('role')!r}; {fix}")
    if not isinstance(m.get("content"), str):
      raise UserError(f"{at}message {j} ({m['role']}) has content of type "
                      f"{type(m.get('content')).__name__}, not a string; {fix}")
  if not any(m["role"] == "assistant" for m in messages):
    raise UserError(f"{at}the conversation has no assistant message, so nothing to train on; "
                    f"{fix}")
  return list(messages)


def render_chat(messages: list[dict[str, str]], tok: Tokenizer, *,
                where: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [n], mask int32 [n]); mask 1 marks a token trained on as a target.

  Only assistant content and its closing <|im_end|> (so the model learns to stop) are 1, plus
  the final EOS when the conversation ends with the assistant. `where` ("file:line") prefixes
  errors.
  """
  messages = validate_messages(messages, where)
  start, end, newline = _marker(tok, IM_START), _marker(tok, IM_END), tok.encode("\n")
  pieces: list[np.ndarray] = []
  masks: list[int] = []

  def add(ids: np.ndarray, m: int) -> None:
    pieces.append(ids)
    masks.append(m)

  for msg in messages:
    train = int(msg["role"] == "assistant")
    add(start, 0)
    add(tok.encode(msg["role"] + "\n"), 0)
    add(tok.encode(msg["content"]), train)
    add(end, train)
    add(newline, 0)
  add(np.array([tok.eos_id], np.int32), int(messages[-1]["role"] == "assistant"))
  tokens = np.concatenate(pieces).astype(np.int32)
  mask = np.repeat(np.array(masks, np.int32), [len(p) for p in pieces])
  return tokens, mask


def chat_text(messages: list[dict[str, str]]) -> str:
  """The conversation as ChatML text (without EOS), for byte counts and debugging."""
  return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
