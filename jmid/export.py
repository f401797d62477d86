"""`python -m jmid.export --workdir=W [--step=S] --out=DIR [--dtype=bfloat16] [--shard-mb=N]`

A checkpoint -> a Hugging Face folder that transformers loads: config.json (RoPE in both the
transformers 4 keys `rope_theta`/`rope_scaling` and the transformers 5 `rope_parameters`),
generation_config.json, safetensors (sharded with an index above --shard-mb) and the run's
tokenizer.json when it has one. It needs only the checkpoint (its meta holds the model spec and
the config), runs on CPU, and streams: one params array at a time is read, split into per-layer
tensors and written, so memory is about one array plus one shard. The folder is written under
a temporary name and renamed at the end; a failure or an interrupt (Ctrl-C, SIGTERM) removes
that temporary folder, so --out is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from jmid import averaging, cli, hf
from jmid import checkpoint as ckpt_lib
from jmid.data import atomic
from jmid.errors import UserError
from jmid.safetensors_io import write_folder

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_NOTHING_WRITTEN = "nothing was written (--out does not exist)"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def architecture(meta: dict[str, Any]) -> str:
  """Qwen3 for q/k norm, Qwen2 for qkv bias, Mistral for a sliding window, else the family the
  lineage came from (a model imported from Mistral exports as Mistral), else Llama."""
  m = meta["model"]
  if m.get("qk_norm"):
    return "Qwen3ForCausalLM"
  if m.get("qkv_bias"):
    return "Qwen2ForCausalLM"
  if m.get("sliding_window"):
    return "MistralForCausalLM"
  for entry in meta.get("lineage", []):
    run = str(entry.get("run") or "")
    if run.startswith("hf:") and run[3:] in ("LlamaForCausalLM", "MistralForCausalLM"):
      return run[3:]
  return "LlamaForCausalLM"


def _rope(m: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
  """(transformers 4 rope_scaling, transformers 5 rope_parameters)."""
  kind = m.get("rope_scaling", "none")
  params: dict[str, Any] = {"rope_type": "default" if kind == "none" else kind,
                            "rope_theta": m["rope_theta"]}
  if kind != "none":
    params["factor"] = m["rope_factor"]
  if kind in ("llama3", "yarn"):
    params["original_max_position_embeddings"] = m["rope_original_max_len"]
  if kind == "llama3":
    params.update(low_freq_factor=m["rope_low_freq_factor"],
                  high_freq_factor=m["rope_high_freq_factor"])
  if kind == "yarn":
    params.update(beta_fast=m["rope_beta_fast"], beta_slow=m["rope_beta_slow"])
    if m.get("rope_attention_factor"):
      params["attention_factor"] = m["rope_attention_factor"]
  legacy = None if kind == "none" else {k: v for k, v in params.items() if k != "rope_theta"}
  return legacy, params


def hf_config(meta: dict[str, Any], dtype: str) -> dict[str, Any]:
  m, arch = meta["model"], architecture(meta)
  legacy, params = _rope(m)
  seq_len = meta.get("config", {}).get("data", {}).get("seq_len", 2048)
  max_len = max(seq_len, int(m.get("rope_original_max_len", 0) * m.get("rope_factor", 1.0)))
  head_dim = m["head_dim"] or m["d_model"] // m["n_heads"]
  return {
      "architectures": [arch], "model_type": MODEL_TYPES[arch],
      "vocab_size": m["vocab_size"], "hidden_size": m["d_model"],
      "intermediate_size": m["d_ff"], "num_hidden_layers": m["n_layers"],
      "num_attention_heads": m["n_heads"], "num_key_value_heads": m["n_kv_heads"],
      "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": max_len,
      "rms_norm_eps": m["norm_eps"], "tie_word_embeddings": m["tie_embeddings"],
      "attention_bias": bool(m["qkv_bias"]),
      "attention_dropout": 0.0, "use_cache": True, "initializer_range": 0.02,
      "rope_theta": m["rope_theta"], "rope_scaling": legacy, "rope_parameters": params,
      "sliding_window": m.get("sliding_window") or None, "use_sliding_window": False,
      "torch_dtype": dtype, "dtype": dtype,
  }


def _hf_tensors(leaves: Iterator[tuple[str, np.ndarray]],
                dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
  """(jmid params key like 'blocks.wq', array) -> (HF name, array) per layer."""
  for key, a in leaves:
    cli.STOP.check(_NOTHING_WRITTEN)  # Ctrl-C / SIGTERM: stop between arrays, clean up
    parts = key.split(".")
    if parts[0] == "blocks":
      local = ".".join(parts[1:])
      for layer in range(a.shape[0]):
        yield hf._layer_names(layer)[local], hf.from_jmid(local, a[layer]).astype(dtype)
    else:
      yield hf.TOP[key], hf.from_jmid(key, a).astype(dtype)


def _checkpoint_leaves(step_dir: str) -> Iterator[tuple[str, np.ndarray]]:
  """The params arrays of a checkpoint, read one at a time."""
  shapes = ckpt_lib.saved_shapes(step_dir)
  for key in sorted(k for k in shapes if k.startswith("params.")):
    yield key[len("params."):], averaging.read_leaf(step_dir, key, shapes[key])


def write_hf(out: str, meta: dict[str, Any], leaves: Iterator[tuple[str, np.ndarray]],
             dtype: str = "float32", shard_mb: float = 5000.0) -> list[str]:
  """The HF folder `out` from a meta and params arrays: written into a temp sibling that is
  renamed at the end. On any failure (full disk, read-only volume, Ctrl-C) the temp sibling
  and the parent folders made for it are removed; nothing else is touched."""
  _check_out(out, dtype)
  given, out = out, os.path.abspath(os.path.expanduser(out))
  with atomic.naming(f"--out={given}", out), atomic.temp_sibling(out) as tmp:
    files = write_folder(tmp, _hf_tensors(leaves, DTYPES[dtype]), int(shard_mb * 1e6))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config(meta, dtype), f, indent=2)
    tokenizer = meta.get("config", {}).get("data", {}).get("tokenizer", "")
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
  if "model" not in meta:
    raise UserError(f"{path} has no model spec in its meta; export needs a checkpoint "
                    "written by jmid")
  return write_hf(out, meta, _checkpoint_leaves(path), dtype, shard_mb)


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
  usage = ("usage: python -m jmid.export --workdir=W [--step=S] --out=DIR "
           "[--dtype=float32|bfloat16|float16] [--shard-mb=5000]")
  bad = [a for a in argv if not (a.startswith("--") and "=" in a)] + sorted(
      set(opts) - {"workdir", "step", "out", "dtype", "shard-mb"})
  if bad or "workdir" not in opts or "out" not in opts:
    raise UserError(usage)
  try:
    step = int(opts["step"]) if "step" in opts else None
    shard_mb = float(opts.get("shard-mb", 5000))
  except ValueError:
    raise UserError(f"--step and --shard-mb must be numbers; {usage}") from None
  with cli.STOP.installed():
    files = export(opts["workdir"], opts["out"], step, opts.get("dtype", "float32"), shard_mb)
  print(f"jmid: exported {opts['workdir']} -> {opts['out']} ({len(files)} safetensors file(s))")
  return 0


if __name__ == "__main__":
  sys.exit(main())
