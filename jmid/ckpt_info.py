"""`python -m jmid.checkpoint info PATH`: what a checkpoint holds, read from its files alone."""

from __future__ import annotations

import math
import os
from typing import Any

from jmid import checkpoint as ckpt_lib


def _model_line(m: dict[str, Any]) -> str:
  if not m:
    return "model: (no spec stored)"
  keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "rope_theta",
          "rope_scaling", "tie_embeddings", "qkv_bias", "qk_norm")
  return "model: " + ", ".join(f"{k}={m[k]}" for k in keys if k in m)


def _origin_line(e: dict[str, Any]) -> str:
  tokens = f"{e['tokens']:,} tokens" if isinstance(e.get("tokens"), int) else "? tokens"
  lr = f"lr {e['lr']:.3e}" if isinstance(e.get("lr"), (int, float)) else "lr ?"
  return (f"  <- {e.get('load', '?')} of {e.get('from', '?')} (run {e.get('run') or '?'}, "
          f"step {e.get('step', '?')}, {tokens}, {lr})")


def describe(step_dir: str) -> str:
  """A few lines: step, tokens, lr, model spec, arrays held, and the lineage to stage one."""
  meta = ckpt_lib.read_meta(step_dir)
  shapes = ckpt_lib.saved_shapes(step_dir)
  groups: dict[str, int] = {}
  for key, shape in shapes.items():
    top = key.split(".", 1)[0]
    groups[top] = groups.get(top, 0) + math.prod(shape)
  lines = [f"checkpoint {step_dir}"]
  lineage = list(meta.get("lineage", []))
  total = (meta.get("tokens") or 0) + sum(e.get("tokens") or 0 for e in lineage)
  if meta:
    run = meta.get("config", {}).get("run", {}).get("name", "?")
    lines.append(f"step {meta.get('step')} | tokens {meta.get('tokens', 0):,} this stage, "
                 f"{total:,} over all stages | lr {meta.get('lr', float('nan')):.3e} | "
                 f"run {run}")
  lines.append(_model_line(meta.get("model", {})))
  order = ("params", "ema", "opt_state")
  held = ", ".join(f"{k} {groups[k] / 1e6:.2f}M values" for k in order if k in groups)
  data = "yes" if os.path.isdir(os.path.join(step_dir, "data")) else "no"
  lines.append(f"state: {held} | data iterator: {data}")
  lines.append("lineage:" + (" first stage (random init)" if meta and not lineage else
                             " unknown (no meta)" if not meta else ""))
  lines += [_origin_line(e) for e in lineage]
  return "\n".join(line for line in lines if line)
