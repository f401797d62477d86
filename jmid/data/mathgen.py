"""Seeded arithmetic word problems with worked answers: the demo corpus's "math" source.

Every answer is exact integer arithmetic written out step by step, so a small model can learn
real structure (carry the intermediate result into the next step) and its loss keeps falling
well below the unigram baseline. numpy's PCG64 stream makes the text identical everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi",
          "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Yuki")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cards", "shells", "coins",
          "stamps", "beads", "cookies", "eggs")
_PRICED = (("notebook", "notebooks"), ("pen", "pens"), ("mug", "mugs"), ("ticket", "tickets"),
           ("lamp", "lamps"), ("plant", "plants"), ("ball", "balls"), ("kite", "kites"))


def _mul(r: np.random.Generator) -> str:
  a, b = int(r.integers(2, 100)), int(r.integers(2, 100))
  return f"Q: What is {a} * {b}?\nA: {a} * {b} = {a * b}.\n"


def _chain(r: np.random.Generator) -> str:
  n = int(r.integers(2, 5))
  vals = [int(v) for v in r.integers(1, 500, size=n + 1)]
  ops = ["+" if s else "-" for s in r.integers(0, 2, size=n)]
  expr = str(vals[0]) + "".join(f" {o} {v}" for o, v in zip(ops, vals[1:]))
  steps, acc = [], vals[0]
  for o, v in zip(ops, vals[1:]):
    new = acc + v if o == "+" else acc - v
    steps.append(f"{acc} {o} {v} = {new}.")
    acc = new
  return f"Q: What is {expr}?\nA: {' '.join(steps)} The answer is {acc}.\n"


def _divide(r: np.random.Generator) -> str:
  d = int(r.integers(2, 13))
  n = int(r.integers(d, 200))
  q, m = divmod(n, d)
  return (f"Q: What is {n} divided by {d}?\nA: {d} * {q} = {d * q} and {n} - {d * q} = {m}, "
          f"so {n} / {d} = {q} remainder {m}.\n")


def _equation(r: np.random.Generator) -> str:
  a, x, b = int(r.integers(2, 13)), int(r.integers(1, 30)), int(r.integers(1, 60))
  c = a * x + b
  return (f"Q: Solve for x: {a}x + {b} = {c}.\nA: {a}x = {c} - {b} = {c - b}, "
          f"so x = {c - b} / {a} = {x}.\n")


def _percent(r: np.random.Generator) -> str:
  p = int(r.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75]))
  base = 20 * int(r.integers(1, 50))
  return f"Q: What is {p}% of {base}?\nA: {base} * {p} / 100 = {base * p // 100}.\n"


def _story(r: np.random.Generator) -> str:
  name, item = _NAMES[int(r.integers(len(_NAMES)))], _ITEMS[int(r.integers(len(_ITEMS)))]
  have, bags, per, lose = (int(v) for v in r.integers([1, 2, 2, 1], [50, 9, 13, 20]))
  got = bags * per
  return (f"Q: {name} has {have} {item}. {name} buys {bags} bags with {per} {item} each and "
          f"then gives away {lose}. How many {item} does {name} have now?\n"
          f"A: {bags} * {per} = {got}. {have} + {got} = {have + got}. "
          f"{have + got} - {lose} = {have + got - lose}. The answer is {have + got - lose}.\n")


def _shopping(r: np.random.Generator) -> str:
  i, j = (int(v) for v in r.choice(len(_PRICED), size=2, replace=False))
  p1, p2, n1, n2 = (int(v) for v in r.integers([2, 2, 2, 2], [30, 30, 10, 10]))
  (s1, pl1), (s2, pl2) = _PRICED[i], _PRICED[j]
  return (f"Q: A {s1} costs {p1} dollars and a {s2} costs {p2} dollars. How much do {n1} {pl1} "
          f"and {n2} {pl2} cost?\nA: {n1} * {p1} = {n1 * p1}. {n2} * {p2} = {n2 * p2}. "
          f"{n1 * p1} + {n2 * p2} = {n1 * p1 + n2 * p2}. "
          f"The answer is {n1 * p1 + n2 * p2} dollars.\n")


KINDS: tuple[Callable[[np.random.Generator], str], ...] = (
    _mul, _chain, _divide, _equation, _percent, _story, _shopping)


def math_documents(seed: int, n_bytes: int) -> Iterator[str]:
  """Worksheets of 1-8 problems, separated by blank lines, until about n_bytes are produced."""
  r = np.random.default_rng(seed)
  total = 0
  while total < n_bytes:
    n = int(r.integers(1, 9))
    doc = "\n".join(KINDS[int(k)](r) for k in r.integers(0, len(KINDS), size=n))
    total += len(doc)
    yield doc


_SYSTEM = ("You are a careful math tutor. Show each step.",
           "Answer with the worked steps and the final number.")


def chat_conversations(seed: int, n_bytes: int) -> Iterator[list[dict[str, str]]]:
  """Tutoring conversations of 1-3 turns (user asks, assistant works it out), some with a
  system prompt, until about n_bytes: the demo's chat source, whose prompts get no loss."""
  r = np.random.default_rng(seed)
  total = 0
  while total < n_bytes:
    messages = [{"role": "system", "content": _SYSTEM[int(r.integers(0, len(_SYSTEM)))]}] \
        if r.random() < 0.5 else []
    for k in r.integers(0, len(KINDS), size=int(r.integers(1, 4))):
      question, answer = KINDS[int(k)](r).split("\nA: ", 1)
      messages.append({"role": "user", "content": question.removeprefix("Q: ")})
      messages.append({"role": "assistant", "content": answer.strip()})
    total += sum(len(m["content"]) for m in messages)
    yield messages
