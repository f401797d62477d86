"""Writing a Hugging Face folder: from a run's checkpoint (`export`, the CLI's work) or from
params in memory (`write_hf`, for `hf.save`). The folder is written under a temporary name and
renamed at the end; a failure or an interrupt (Ctrl-C, SIGTERM) removes that temporary folder,
so the output is either complete or absent. It streams: one params array at a time is read,
split into per-layer tensors and written, so memory is about one array plus one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from jmid import averaging, cli, families
from jmid import checkpoint as ckpt_lib
from jmid.data import atomic
from jmid.errors import UserError
from jmid.safetensors_io import write_folder

_NOTHING_WRITTEN = "nothing was written (--out does not exist)"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def hf_config(meta: ckpt_lib.Meta, dtype: str) -> dict[str, Any]:
  """The config.json of a checkpoint's meta (its model spec, and the seq_len it trained at)."""
  return families.hf_config(meta.model, meta.seq_len or 2048, dtype)


def _hf_tensors(leaves: Iterator[tuple[str, np.ndarray]], family: families.Family,
                dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
  """(jmid params key like 'blocks.attn.wq', array) -> (HF name, array) per layer."""
  for key, a in leaves:
    cli.STOP.check(_NOTHING_WRITTEN)  # Ctrl-C / SIGTERM: stop between arrays, clean up
    parts = key.split(".")
    if parts[0] == "blocks":
      local = ".".join(parts[1:])
      for layer in range(a.shape[0]):
        yield families.layer_names(family, layer)[local], families.from_jmid(local, a[layer]).astype(dtype)
    else:
      yield families.TOP[key], families.from_jmid(key, a).astype(dtype)


def _checkpoint_leaves(step_dir: str) -> Iterator[tuple[str, np.ndarray]]:
  """The params arrays of a checkpoint, read one at a time."""
  shapes = ckpt_lib.saved_shapes(step_dir)
  for key in sorted(k for k in shapes if k.startswith("params.")):
    yield key[len("params."):], averaging.read_leaf(step_dir, key, shapes[key])


def write_hf(out: str, meta: ckpt_lib.Meta, leaves: Iterator[tuple[str, np.ndarray]],
             dtype: str = "float32", shard_mb: float = 5000.0) -> list[str]:
  """The HF folder `out` from a meta and params arrays: written into a temp sibling that is
  renamed at the end. On any failure (full disk, read-only volume, Ctrl-C) the temp sibling
  and the parent folders made for it are removed; nothing else is touched."""
  _check_out(out, dtype)
  config = hf_config(meta, dtype)  # a model no family can hold fails before anything is written
  family = families.family_of(meta.model)
  given, out = out, os.path.abspath(os.path.expanduser(out))
  with atomic.naming(f"--out={given}", out), atomic.temp_sibling(out) as tmp:
    files = write_folder(tmp, _hf_tensors(leaves, family, DTYPES[dtype]), int(shard_mb * 1e6))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    tokenizer = meta.tokenizer
    if tokenizer and tokenizer != "byte" and os.path.isfile(tokenizer):
      shutil.copy(tokenizer, os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"_from_model_config": True}, f, indent=2)
    os.rename(tmp, out)
  return files


def _check_out(out: str, dtype: str) -> None:
  """The cheap checks, before any checkpoint is read."""
  if dtype not in DTYPES:
    raise UserError(f"--dtype={dtype}: use one of {', '.join(DTYPES)}")
  if os.path.exists(out):
    raise UserError(f"--out={out} exists; give a new folder (nothing is overwritten)")


def find_step(workdir: str, step: int | None) -> str:
  """The checkpoint to export: step `step` of the run in `workdir`, else its latest one (or
  `workdir` itself when it is a step folder)."""
  if step is None:
    return ckpt_lib.resolve_step_dir(workdir, "--workdir")
  full = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(full):
    raise UserError(f"--workdir={workdir}: no such directory")
  ckpt_dir = os.path.join(full, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) \
      if os.path.isdir(ckpt_dir) else []
  if step not in steps:
    have = f"the steps there are {', '.join(map(str, steps))}" if steps else \
        "it holds no checkpoints"
    raise UserError(f"--step={step}: step {step} is not in {ckpt_dir}; {have}")
  return os.path.join(ckpt_dir, str(step))


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32",
           shard_mb: float = 5000.0) -> list[str]:
  """Writes the HF folder `out` from a run's checkpoint; returns the safetensors files."""
  _check_out(out, dtype)
  path = find_step(workdir, step)
  meta = ckpt_lib.read_meta(path)
  if not meta.model:
    raise UserError(f"{path} has no model spec in its meta; export needs a checkpoint "
                    "written by jmid")
  return write_hf(out, meta, _checkpoint_leaves(path), dtype, shard_mb)
