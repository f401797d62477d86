"""`python -m jmid.checkpoint info|verify PATH`: what a checkpoint holds, and whether every array
reads back as saved, from its files alone."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

from jmid import checkpoint as ckpt_lib
from jmid import families, fs
from jmid.checkpoint import DamagedCheckpoint, legacy
from jmid.checkpoint.meta import Origin
from jmid.errors import UserError, first_line


def _model_line(m: dict[str, Any]) -> str:
  if not m:
    return "model: (no spec stored)"
  keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "rope_theta",
          "rope_scaling", "tie_embeddings", "qkv_bias", "qk_norm")
  if_set = ("layer_pattern", "sliding_window", "rope_local_theta", "attn_softcap",
            "final_softcap")
  family = m.get("family") or f"{families.family_of(m).name} (by its switches)"
  return (f"model: family={family}, " + ", ".join(f"{k}={m[k]}" for k in keys if k in m)
          + "".join(f", {k}={m[k]!r}" for k in if_set if m.get(k)))


def _origin_line(e: Origin) -> str:
  if e.architecture:  # a Hugging Face folder
    return f"  <- {e.load} of {e.path} (Hugging Face {e.architecture})"
  tokens = "? tokens" if e.tokens is None else f"{e.tokens:,} tokens"
  lr = "lr ?" if e.lr is None else f"lr {e.lr:.3e}"
  step = "?" if e.step is None else e.step
  return f"  <- {e.load} of {e.path} (run {e.run or '?'}, step {step}, {tokens}, {lr})"


def verify(step_dir: str) -> tuple[bool, str]:
  """(intact, status): reads every array of state/ alone onto the CPU (memory: about one
  array) and checks it against the fingerprints saved in meta; data/ must parse too."""
  try:
    meta = ckpt_lib.read_meta(step_dir)
    tree = ckpt_lib.saved_tree(step_dir)
  except DamagedCheckpoint as e:
    return False, f"DAMAGED: {e.summary}"
  keys = sorted(ckpt_lib.path_str(p) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
                if hasattr(leaf, "shape"))
  bad = []
  for key in keys:
    try:
      ckpt_lib.read_array(step_dir, key, meta, tree)
    except DamagedCheckpoint as e:
      bad.append(f"{key} ({e.kind})")
  problems = [f"arrays {ckpt_lib.names(bad)}"] if bad else []
  data = os.path.join(step_dir, "data")
  for path in [os.path.join(data, n) for n in sorted(fs.listdir(data)) if n.endswith(".json")] \
      if fs.isdir(data) else []:
    try:
      json.loads(fs.read_text(path))
    except (OSError, ValueError) as e:
      problems.append(f"data/{os.path.basename(path)} ({first_line(e)})")
  if problems:
    return False, "DAMAGED: " + "; ".join(problems)
  if not meta.fingerprints:
    return True, f"no fingerprints (written before jmid recorded them), {len(keys)} arrays readable"
  unchecked = len(set(keys) - {legacy.new_key(k) for k in meta.fingerprints})
  note = f" ({unchecked} without a fingerprint, readable)" if unchecked else ""
  return True, f"ok, {len(keys) - unchecked} arrays verified{note}"


def verify_all(path: str) -> int:
  """`verify PATH`: one line per checkpoint (a step folder, or every step of a workdir);
  0 when all are intact, else one UserError naming the damaged ones."""
  damaged = []
  for step_dir in ckpt_lib.step_dirs(path):
    ok, status = verify(step_dir)
    print(f"{step_dir}: {status}", flush=True)
    if not ok:
      damaged.append(step_dir)
  if damaged:
    raise UserError(f"damaged checkpoint(s): {ckpt_lib.names(damaged, 5)} (lines above name "
                    "the arrays); resume or export from an intact step (a resume skips damaged "
                    "ones by itself)")
  return 0


def describe(step_dir: str) -> str:
  """A few lines: step, tokens, lr, model spec, arrays held, integrity, and the lineage."""
  intact, status = verify(step_dir)
  if not intact:
    raise UserError(f"checkpoint {step_dir} is damaged: {status.removeprefix('DAMAGED: ')}; "
                    "use an older step")
  meta = ckpt_lib.read_meta(step_dir)
  shapes = ckpt_lib.saved_shapes(step_dir)
  groups: dict[str, int] = {}
  for key, shape in shapes.items():
    top = key.split(".", 1)[0]
    groups[top] = groups.get(top, 0) + math.prod(shape)
  lines = [f"checkpoint {step_dir}"]
  total = (meta.tokens or 0) + sum(e.tokens or 0 for e in meta.lineage)
  if not meta.empty:
    lr = float("nan") if meta.lr is None else meta.lr
    lines.append(f"step {meta.step} | tokens {meta.tokens or 0:,} this stage, "
                 f"{total:,} over all stages | lr {lr:.3e} | run {meta.run_name or '?'}")
  lines.append(_model_line(meta.model))
  order = ("params", "ema", "opt_state")
  held = ", ".join(f"{k} {groups[k] / 1e6:.2f}M values" for k in order if k in groups)
  data = "yes" if fs.isdir(os.path.join(step_dir, "data")) else "no"
  lines.append(f"state: {held} | data iterator: {data}")
  lines.append(f"integrity: {status}")
  lines.append("lineage:" + (" first stage (random init)" if not meta.empty and not meta.lineage
                             else " unknown (no meta)" if meta.empty else ""))
  lines += [_origin_line(e) for e in meta.lineage]
  return "\n".join(line for line in lines if line)
