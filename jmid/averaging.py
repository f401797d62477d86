"""`python -m jmid.checkpoint average --out=DIR CKPT CKPT ...`: the mean of N checkpoints' params.

OLMo 2 "soups" anneal runs that differ only in data order. The mean is streamed one array at a
time (a running float32 sum on the host), so memory is about one model plus one array, never
N models. The result is a step folder {state: {params}, meta} that init.from_path and export
accept; its lineage lists every input.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jmid import checkpoint as ckpt_lib
from jmid.errors import UserError


def _put(tree: dict[str, Any], parts: list[str], value: Any) -> None:
  """tree[parts[0]][parts[1]]... = value, making the inner dicts on the way."""
  for p in parts[:-1]:
    tree = tree.setdefault(p, {})
  tree[parts[-1]] = value


def read_leaf(step_dir: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
  """One array of state/ (named like 'params.blocks.wq', of `shape`), restored alone onto the
  CPU in its saved dtype, checked against its fingerprint, then as a float32 copy."""
  leaf = ckpt_lib.read_array(step_dir, key)
  if tuple(leaf.shape) != tuple(shape):
    raise UserError(f"checkpoint {step_dir}: {key} is {tuple(leaf.shape)}, not {tuple(shape)}")
  return np.array(leaf, dtype=np.float32)  # a writable copy: it becomes the running sum


def average(paths: list[str], out_dir: str, key: str = "params") -> ckpt_lib.Meta:
  """Writes the elementwise mean of `key` ('params' or 'ema') over `paths`; returns its meta."""
  if len(paths) < 2:
    raise UserError("average: give at least two checkpoints (run workdirs or step folders)")
  step_dirs = [ckpt_lib.resolve_step_dir(p, "CKPT") for p in paths]
  shapes = [{k: v for k, v in ckpt_lib.saved_shapes(d).items() if k.startswith(key + ".")}
            for d in step_dirs]
  if not shapes[0]:
    raise UserError(f"average: {step_dirs[0]} holds no {key}; use --key=params")
  for d, s in zip(step_dirs[1:], shapes[1:]):
    if s != shapes[0]:
      diff = sorted(k for k in set(s) | set(shapes[0]) if s.get(k) != shapes[0].get(k))
      raise UserError(f"average: {d} has another shape than {step_dirs[0]} "
                      f"({', '.join(diff[:3])}); average checkpoints of one model only")
  mean: dict[str, Any] = {}
  for name, shape in sorted(shapes[0].items()):
    total = read_leaf(step_dirs[0], name, shape)
    for d in step_dirs[1:]:
      total += read_leaf(d, name, shape)
    _put(mean, name.split(".")[1:], total / len(step_dirs))
  metas = [ckpt_lib.read_meta(d) for d in step_dirs]
  meta = ckpt_lib.Meta(step=0, tokens=0, lr=metas[0].lr, model=metas[0].model,
                       config=metas[0].config, averaged=tuple(step_dirs), lineage=tuple(
                           m.origin(d, f"average({key})") for d, m in zip(step_dirs, metas)))
  ckpt_lib.save_params(out_dir, mean, meta)
  return meta


def main(argv: list[str]) -> None:
  opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
  ckpts = [a for a in argv if not a.startswith("--")]
  unknown = set(opts) - {"out", "key"} | {a for a in argv if a.startswith("--") and "=" not in a}
  if unknown or "out" not in opts or opts.get("key", "params") not in ("params", "ema"):
    raise UserError("usage: python -m jmid.checkpoint average --out=DIR [--key=params|ema] "
                    "CKPT CKPT ...")
  if os.path.exists(opts["out"]):
    raise UserError(f"average: --out={opts['out']} exists; give a new folder (nothing is "
                    "overwritten)")
  key = opts.get("key", "params")
  average(ckpts, opts["out"], key)
  print(f"jmid: averaged {len(ckpts)} checkpoints' {key} -> {opts['out']}")
