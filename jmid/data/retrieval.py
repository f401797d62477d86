"""Synthetic retrieval documents, the kind long-context recipes add to a context-extension
mixture: a pass key hidden at a random depth in a haystack, a question at the end, the answer.

Lengths are drawn log-uniformly, so most documents are short (many retrievals per step) and
some reach `max_tokens` (the distances the extended context must cover). The phrasings vary
and include the passkey test's own (jmid.passkey); the haystack comes from the caller, and the
demo's (filler_sentences) never holds the test's filler.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jmid.data.tokenizer import Tokenizer

NEEDLES = ("The pass key is {key}. Remember it. {key} is the pass key. ",
           "Remember this pass key: {key}. The pass key is {key}. ",
           "Note the pass key. The pass key is {key}. ")
QUESTIONS = ("\nWhat is the pass key? The pass key is",
             "\nRecall the pass key from the text above. The pass key is",
             "\nThe pass key is")
ANSWER = " {key}"


def retrieval_documents(tok: Tokenizer, haystacks: Iterator[str], seed: int, n_docs: int,
                        min_tokens: int, max_tokens: int
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(tokens, mask) per document, EOS included: a haystack (the next text of `haystacks`, cut
  to length) with the needle at a random depth, then the question and the answer.

  Every token is trained but the key where the needle first states it (random digits, nothing
  to learn): the answer and any repeat of the key are copies over some distance.
  """
  r = np.random.default_rng(seed)
  for _ in range(n_docs):
    key = int(r.integers(10000, 100000))
    before, after = NEEDLES[int(r.integers(len(NEEDLES)))].split("{key}", 1)
    pieces = [tok.encode(before), tok.encode(str(key)), tok.encode(after.format(key=key)),
              tok.encode(QUESTIONS[int(r.integers(len(QUESTIONS)))]),
              tok.encode(ANSWER.format(key=key)), [tok.eos_id]]
    pieces = [np.asarray(p, np.int32) for p in pieces]  # encoded apart: the key's span is known
    fixed = sum(len(p) for p in pieces)
    total = int(np.exp(r.uniform(np.log(min_tokens), np.log(max_tokens))))
    room = max(0, total - fixed)
    hay = np.zeros(0, np.int32)
    while len(hay) < room:
      hay = np.concatenate([hay, np.asarray(tok.encode(next(haystacks)), np.int32)])
    depth = int(r.integers(0, room + 1))
    tokens = np.concatenate([hay[:depth], *pieces[:3], hay[depth:room], *pieces[3:]])
    mask = np.ones(len(tokens), np.int32)
    start = depth + len(pieces[0])
    mask[start:start + len(pieces[1])] = 0
    yield tokens, mask


# No word of the passkey test's filler sentences: its haystack stays unseen.
_SUBJECTS = ("sea", "road", "river", "house", "tree", "cat", "bird", "wall", "door", "moon",
             "snow", "rock", "cloud", "field", "lake", "hill", "garden", "bridge", "town", "boat")
_STATES = ("red", "white", "quiet", "tall", "warm", "cold", "old", "wide", "bright", "dark",
           "calm", "far away", "near", "soft", "still", "open")
_PHRASES = ("On and on it goes.", "Time passes.", "Nothing happens.", "The day goes on.",
            "So it is.", "Then it rains.")


def filler_sentences(seed: int, repeat_chars: int = 4000) -> Iterator[str]:
  """Endless haystacks: a few random plain sentences ("The river is calm.", "The boat number
  is 3917.") repeated in a cycle to `repeat_chars`. The passkey test's filler is such a cycle
  too, of other sentences: a model reads it by copying what came one cycle back, the skill that
  copies the key, so these haystacks train retrieval in every token, not only in the answer
  (and numbers in them teach that digits are copied, where the math source teaches them as
  computed)."""
  r = np.random.default_rng(seed)
  while True:
    cycle = []
    for _ in range(int(r.integers(3, 9))):
      kind, subject = r.random(), _SUBJECTS[int(r.integers(len(_SUBJECTS)))]
      if kind < 0.2:
        cycle.append(_PHRASES[int(r.integers(len(_PHRASES)))])
      elif kind < 0.5:  # numbers to copy one cycle on: digits are read by copying, not guessed
        cycle.append(f"The {subject} number is {int(r.integers(10, 10**int(r.integers(2, 7))))}.")
      else:
        cycle.append(f"The {subject} is {_STATES[int(r.integers(len(_STATES)))]}.")
    text = " ".join(cycle) + " "
    yield text * (repeat_chars // len(text) + 1)
