"""A tiny real BPE tokenizer.json trained in-process (no download), for data tests."""

from __future__ import annotations

import random

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the a cat dog sat on mat and ran to über naïve café 数学 math is fun proof lemma "
         "theorem 12 + 7 = 19 x y z , . ? ! ( ) def return print").split()


def sentences(n: int, seed: int = 0) -> list[str]:
  """n pseudo-sentences mixing ASCII, accents, CJK, digits and punctuation."""
  r = random.Random(seed)
  return [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 14))) + r.choice(".?!\n")
          for _ in range(n)]


def train_bpe(path: str, vocab_size: int = 300, specials: list[str] | None = None) -> str:
  """Trains a byte-level BPE on generated sentences, saves it at `path`, returns the path."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                special_tokens=SPECIALS if specials is None else specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(sentences(400), trainer)
  tok.save(path)
  return path
