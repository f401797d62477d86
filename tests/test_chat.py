"""Chat rendering: ChatML tokens and a loss mask that trains only the assistant's answers."""

from __future__ import annotations

import numpy as np
import pytest

from jmid.errors import UserError
from jmid.data.chat import chat_text, render_chat
from jmid.data.tokenizer import ByteTokenizer, HFTokenizer
from tests.bpe import train_bpe

CONVO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19."},
    {"role": "user", "content": "And über 数学?"},
    {"role": "assistant", "content": "The café is naïve!"},
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
  return HFTokenizer(train_bpe(str(tmp_path_factory.mktemp("tok") / "tokenizer.json")))


def test_bpe_mask_covers_exactly_assistant_content_end_and_eos(bpe):
  tokens, mask = render_chat(CONVO, bpe)
  assert tokens.dtype == np.int32 and mask.dtype == np.int32 and tokens.shape == mask.shape
  im_start, im_end = bpe.token_to_id("<|im_start|>"), bpe.token_to_id("<|im_end|>")
  # The markers are single special ids, and the whole thing is the ChatML text plus EOS.
  assert (tokens == im_start).sum() == len(CONVO) and (tokens == im_end).sum() == len(CONVO)
  assert bpe.decode(tokens) == chat_text(CONVO) + "<|endoftext|>"
  assert tokens[-1] == bpe.eos_id and mask[-1] == 1
  trained = bpe.decode(tokens[mask == 1])
  assert trained == "12 + 7 = 19.<|im_end|>The café is naïve!<|im_end|><|endoftext|>"
  # Every masked-out token belongs to the system/user turns or to a role header.
  ignored = bpe.decode(tokens[mask == 0])
  assert ignored == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
                     "What is 12 + 7?<|im_end|>\n<|im_start|>assistant\n\n<|im_start|>user\n"
                     "And über 数学?<|im_end|>\n<|im_start|>assistant\n\n")
  # Runs of ones: each answer ending in <|im_end|> (the model learns to stop), then EOS alone
  # (the "\n" after the last <|im_end|> is template, not answer).
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  runs = [tokens[a:b] for a, b in zip(edges[::2], edges[1::2])]
  assert [bpe.decode(r) for r in runs] == ["12 + 7 = 19.<|im_end|>",
                                           "The café is naïve!<|im_end|>", "<|endoftext|>"]
  assert runs[0][-1] == runs[1][-1] == im_end and runs[2].tolist() == [bpe.eos_id]


def test_byte_tokenizer_renders_markers_as_text():
  tok = ByteTokenizer()
  tokens, mask = render_chat(CONVO[1:3], tok)
  assert tok.decode(tokens) == chat_text(CONVO[1:3])  # EOS has no bytes
  assert tokens[-1] == tok.EOS and mask[-1] == 1
  assert tok.decode(tokens[mask == 1]) == "12 + 7 = 19.<|im_end|>"
  assert tok.decode(tokens[mask == 0]) == ("<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
                                           "<|im_start|>assistant\n\n")


def test_conversation_ending_with_user_has_no_loss_on_eos(bpe):
  tokens, mask = render_chat(CONVO[:4], bpe)
  assert tokens[-1] == bpe.eos_id and mask[-1] == 0
  assert bpe.decode(tokens[mask == 1]) == "12 + 7 = 19.<|im_end|>"


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"),
    ("hello", "non-empty list, got str"),
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "role 'tool'"),
    ([{"role": "assistant", "content": 3}], "content of type int"),
    ([{"role": "assistant"}], "content of type NoneType"),
    (["hi", {"role": "assistant", "content": "y"}], "message 0 is a str"),
])
def test_bad_conversations_are_one_line_user_errors(messages, match):
  with pytest.raises(UserError, match=match) as e:
    render_chat(messages, ByteTokenizer(), where="chats.jsonl:7")
  assert str(e.value).startswith("chats.jsonl:7: ") and "\n" not in str(e.value)
