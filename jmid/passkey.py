"""Passkey retrieval, the needle test of long-context recipes: a 5-digit number hidden at a
depth in filler text; the model must produce it after the question.

A sample is exactly `length` tokens of prompt and answer (the filler is cut to fit), so every
sample of a length is one row of one batch. Scoring is greedy exact match of every answer
token, computed in one forward pass: greedy decoding produces the answer exactly when, at each
answer position, the argmax after the answer's own prefix is the next answer token. Keys,
depths and filler come from a seed through the run's own tokenizer: no download.

    python -m jmid.passkey --workdir=runs/longctx [--step=S] --lengths=1024,4096 \\
        [--depths=0,0.25,0.5,0.75,1] [--samples=4] [--context=N] [--out=passkey.json]

prints a length x depth table and writes JSON (default: passkey-<step>.json in the run);
--workdir may be a run, a step folder or a Hugging Face folder (--tokenizer=T replaces its
tokenizer.json); --context=N splits each sequence over N of the local devices (ring
attention) for lengths one device cannot hold. In training, train.passkey_lengths adds
`eval/passkey/<length>` (accuracy averaged over depths) to every eval.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jmid import cli, fs
from jmid.errors import UserError

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"
REACH = 8  # lengths beyond this many times the trained context are refused (typos, not tests)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class Sample:
  tokens: np.ndarray  # int32 [length + 1]: the model reads [:-1] and is scored on [1:]
  answer: slice  # the positions of [1:] that hold the answer


def fixed_tokens(tok: Any) -> int:
  """Tokens of a prompt with no filler: the shortest length a sample can have."""
  return sum(len(tok.encode(t.format(key=10000))) for t in (INTRO, NEEDLE, QUESTION, ANSWER))


def make_sample(tok: Any, length: int, depth: float, seed: int) -> Sample:
  """The prompt with its key at `depth` (0: right after the intro, 1: just before the
  question), exactly length + 1 tokens; the key is drawn from `seed`."""
  key = int(np.random.default_rng(seed).integers(10000, 100000))
  intro, needle, question, answer = (np.asarray(tok.encode(t.format(key=key)), np.int32)
                                     for t in (INTRO, NEEDLE, QUESTION, ANSWER))
  room = length + 1 - len(intro) - len(needle) - len(question) - len(answer)
  if room < 0:
    raise UserError(f"passkey length {length} is shorter than the prompt's fixed text "
                    f"({fixed_tokens(tok)} tokens); use longer lengths")
  filler = np.resize(np.asarray(tok.encode(FILLER), np.int32), room)
  at = int(round(depth * room))
  tokens = np.concatenate([intro, filler[:at], needle, filler[at:], question, answer])
  return Sample(tokens, slice(length - len(answer), length))


def check_lengths(lengths: Sequence[int], trained: int, tok: Any, where: str) -> None:
  """Each length must hold the prompt and be within REACH times the trained context."""
  least = fixed_tokens(tok)
  for n in lengths:
    if not isinstance(n, int) or n <= least:
      raise UserError(f"{where}: passkey length {n!r} must be an integer above the prompt's "
                      f"fixed text ({least} tokens)")
    if n > REACH * trained:
      raise UserError(f"{where}: passkey length {n} is beyond this model's reach ({REACH}x its "
                      f"trained context of {trained} tokens); test lengths up to "
                      f"{REACH * trained}")


def sample_seed(seed: int, length: int, depth: float, i: int) -> int:
  return zlib.crc32(f"{seed}/{length}/{depth:.4f}/{i}".encode())


def evaluate(predict: Callable[[np.ndarray], np.ndarray], tok: Any, lengths: Sequence[int],
             depths: Sequence[float], samples: int, seed: int, rows: int
             ) -> dict[int, dict[float, float]]:
  """{length: {depth: accuracy}}. predict(inputs [B, L] int32) -> argmax ids [B, L]; B is a
  multiple of `rows` (the rows a batch must split into), padded with repeats."""
  out: dict[int, dict[float, float]] = {}
  for length in lengths:
    cells = [(d, make_sample(tok, length, d, sample_seed(seed, length, d, i)))
             for d in depths for i in range(samples)]
    hits: dict[float, list[bool]] = {d: [] for d in depths}
    batch = -(-len(cells) // rows) * rows
    tokens = np.stack([s.tokens for _, s in cells] + [cells[0][1].tokens] * (batch - len(cells)))
    pred = np.asarray(predict(tokens[:, :-1]))
    for r, (d, s) in enumerate(cells):
      hits[d].append(bool(np.array_equal(pred[r, s.answer], s.tokens[1:][s.answer])))
    out[length] = {d: float(np.mean(h)) for d, h in hits.items()}
  return out


def summary(table: dict[int, dict[float, float]]) -> dict[str, float]:
  """`eval/passkey/<length>`: accuracy averaged over depths."""
  return {f"eval/passkey/{n}": float(np.mean(list(row.values()))) for n, row in table.items()}


def format_table(table: dict[int, dict[float, float]]) -> str:
  depths = list(next(iter(table.values())))
  lines = ["length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean"]
  for n, row in table.items():
    lines.append(f"{n:>6} | " + " | ".join(f"{row[d]:>{len(f'depth {d:g}')}.2f}" for d in depths)
                 + f" | {np.mean(list(row.values())):.2f}")
  return "\n".join(lines)


def make_predict(graphdef: Any, param_sh: Any, mesh: Any, layout: str) -> Callable:
  """(params, inputs [B, L]) -> argmax ids [B, L], the rows one document each, run on `mesh`
  in the layout ring attention wants (the argmax comes back in the row's own order)."""
  import jax
  import jax.numpy as jnp
  from jmid import model as model_lib
  from jmid import sharding, steps

  def predict(params: dict, inputs: jax.Array) -> jax.Array:
    b, t = inputs.shape
    batch = {"inputs": inputs, "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32)}
    batch, used = steps.in_context_layout(batch, layout)
    logits = model_lib.apply(graphdef, params, batch["inputs"], batch["positions"],
                             batch["segment_ids"], used)
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    perm = steps.context_permutation(layout, t)
    return ids if perm is None else jnp.take(ids, jnp.asarray(np.argsort(perm)), axis=-1)

  batch_sh = sharding.batch_sharding(mesh)
  jitted = jax.jit(predict, in_shardings=(param_sh, batch_sh))

  def call(params: dict, inputs: np.ndarray) -> np.ndarray:
    with jax.set_mesh(mesh):
      x = jax.device_put(inputs.astype(np.int32), batch_sh)
      return np.asarray(jax.device_get(jitted(params, x)))
  return call


# The standalone command ----------------------------------------------------------------------

def _floats(text: str, what: str) -> list[float]:
  try:
    return [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise UserError(f"--{what}={text}: give comma-separated numbers") from None


@dataclasses.dataclass
class Loaded:
  """What the standalone command evaluates: a model on a mesh, its tokenizer and reach."""

  model: Any  # ModelConfig
  mesh: Any
  predict: Callable[[np.ndarray], np.ndarray]
  tokenizer: Any
  trained: int  # the context it was trained at
  where: str  # the step folder or Hugging Face folder
  out: str  # the default JSON path


def _load(path: str, step: int | None, context: int, layout: str, tokenizer: str = ""
          ) -> Loaded:
  """A run (its latest or --step checkpoint), a step folder or a Hugging Face folder, with
  params sharded over every local device (fsdp) and the sequence over `context` of them.
  `tokenizer` overrides the model's own (the run's data.tokenizer, the folder's
  tokenizer.json)."""
  from jmid import checkpoint as ckpt_lib
  from jmid import config as config_lib
  from jmid import handoff, hf, sharding
  from jmid import model as model_lib
  from jmid.data.tokenizer import load_tokenizer

  full = os.path.abspath(os.path.expanduser(path))
  source = handoff.find(os.path.join(full, "checkpoints", str(step)) if step is not None
                        else full)
  mesh_cfg = config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, context=context,
                                   context_layout=layout)
  if isinstance(source, handoff.HfFolder):
    fields = hf.model_fields(source.config, source.path)
    model = config_lib.ModelConfig(**{**_MODEL_DEFAULTS, **fields})
    tok_file = os.path.join(source.path, "tokenizer.json")
    if not tokenizer and not os.path.isfile(tok_file):
      raise UserError(f"{source.path} has no tokenizer.json; passkey prompts need the "
                      "model's own tokenizer: give --tokenizer=PATH (or 'byte')")
    tokenizer = tokenizer or tok_file
    trained = int(source.config.get("max_position_embeddings") or 4096)
    out = os.path.abspath(f"passkey-{os.path.basename(source.path)}.json")
  else:
    model = config_lib.ModelConfig(**source.meta.model)
    tokenizer = tokenizer or source.meta.tokenizer
    trained = source.meta.seq_len or 4096
    run_dir = os.path.dirname(os.path.dirname(source.path))
    out = os.path.join(run_dir, f"passkey-{os.path.basename(source.path)}.json")
  tok = load_tokenizer(tokenizer)
  mesh = sharding.make_mesh(mesh_cfg)
  graphdef, abstract_params, names = model_lib.abstract_model(model)
  param_sh = sharding.tree_shardings(mesh, names, abstract_params)
  target = ckpt_lib.abstract_with_shardings(abstract_params, param_sh)
  if isinstance(source, handoff.HfFolder):
    params = hf.load_params(source.path, target)
  else:
    params = ckpt_lib.restore_tree(source.path, {"params": target})["params"]
  predict = make_predict(graphdef, param_sh, mesh, layout)
  return Loaded(model, mesh, lambda x: predict(params, x), tok, trained, source.path, out)


# a Hugging Face folder fixes the architecture; how to compute it is ours
_MODEL_DEFAULTS = {"attention": "xla", "remat": "none", "param_dtype": "float32",
                   "compute_dtype": "float32", "init_std": 0.02}


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  usage = ("usage: python -m jmid.passkey --workdir=RUN_OR_FOLDER [--step=S] --lengths=L1,L2 "
           "[--depths=0,0.5,1] [--samples=4] [--context=N] [--layout=zigzag] [--tokenizer=T] "
           "[--seed=0] [--out=FILE.json]")
  opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
  unknown = set(opts) - {"workdir", "step", "lengths", "depths", "samples", "context", "layout",
                         "tokenizer", "seed", "out"}
  if unknown or "workdir" not in opts or "lengths" not in opts or len(opts) != len(argv):
    raise UserError(usage)
  try:
    step = int(opts["step"]) if "step" in opts else None
    lengths = [int(x) for x in opts["lengths"].split(",") if x.strip()]
    samples, context, seed = (int(opts.get(k, d)) for k, d in
                              (("samples", 4), ("context", 1), ("seed", 0)))
  except ValueError:
    raise UserError(f"--step, --lengths, --samples, --context and --seed take integers; "
                    f"{usage}") from None
  depths = _floats(opts["depths"], "depths") if "depths" in opts else list(DEPTHS)
  if not lengths or not depths or samples < 1 or any(not 0 <= d <= 1 for d in depths):
    raise UserError(f"--lengths and --depths (in [0, 1]) must not be empty and --samples >= 1; "
                    f"{usage}")
  from jmid import config as config_lib
  layout = opts.get("layout", "zigzag")
  if layout not in config_lib.CONTEXT_LAYOUTS:
    raise UserError(f"--layout={layout}: use one of {', '.join(config_lib.CONTEXT_LAYOUTS)}")
  with cli.STOP.installed():
    run = _load(opts["workdir"], step, context, layout, opts.get("tokenizer", ""))
    check_lengths(lengths, run.trained, run.tokenizer, run.where)
    n = int(run.mesh.shape["context"])
    for length in lengths:  # a ConfigError is a UserError: one line
      config_lib.check_context_length(run.model.attention, config_lib.MeshConfig(
          1, -1, 1, n, layout), n, length, "--lengths")
    rows = int(run.mesh.shape["data"] * run.mesh.shape["fsdp"])
    table = evaluate(run.predict, run.tokenizer, lengths, depths, samples, seed, rows)
  where = run.where
  print(f"passkey retrieval of {where} ({samples} sample(s) per cell, greedy exact match):")
  print(format_table(table))
  out = opts.get("out") or run.out
  record = {"checkpoint": where, "samples": samples, "seed": seed, **summary(table),
            "table": {str(n): {f"{d:g}": a for d, a in row.items()} for n, row in table.items()}}
  fs.write_text(out, json.dumps(record, indent=1))
  print(f"jmid: wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
