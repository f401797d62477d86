"""Hugging Face folders in and out: what a user calls (set_model, load, save) and reading.

`load(path)` gives a callable model (token ids [B, T] -> float32 logits) for notebooks and
tests; `model_fields(config_json)` is the jmid model spec a config.json describes (the
families and their tables are in families.py); `load_params(path, abstract_params)` reads the
weights straight onto the shardings the abstract params carry: each device's callback reads
only its layers from the memory-mapped safetensors, so the whole model is never on one host
in float32 at once. `save` writes a folder through hf_write.py (the export CLI's writer).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmid import checkpoint as ckpt_lib
from jmid import hf_write
from jmid import model as model_lib
from jmid.config import ModelConfig
from jmid.errors import UserError
from jmid.families import TOP, family_of, layer_names, model_fields, to_jmid
from jmid.safetensors_io import Folder


def read_config(path: str) -> dict[str, Any]:
  """A folder's config.json, checked (model_fields) so every problem names the file."""
  where = os.path.join(path, "config.json")
  try:
    with open(where) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{where} is unreadable ({e})") from None
  model_fields(config, path)
  return config


def contradictions(model: ModelConfig, hf: dict[str, Any], path: str = "") -> list[str]:
  """`model.k=v (config.json: w)` for every model.* field that differs from what the folder's
  config.json fixes; head_dim compares the resolved width (0 means d_model // n_heads), and
  family "" the family its switches match."""
  out = []
  for k, want in model_fields(hf, path).items():
    have = getattr(model, k)
    if (k == "head_dim" and model.dh == want) or (
        k == "family" and not have and family_of(dataclasses.asdict(model)).name == want):
      continue
    if have != want:
      note = f" (= {model.dh})" if k == "head_dim" and have == 0 else ""
      out.append(f"model.{k}={have!r}{note} (config.json: {want!r})")
  return out


def load_params(path: str, abstract_params: Any) -> Any:
  """Params from a HF folder onto the shardings in `abstract_params` (ShapeDtypeStructs)."""
  folder = Folder(path)
  family = family_of(model_fields(read_config(path), path))
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)
  missing: list[str] = []
  leaves = []
  for p, leaf in flat[0]:
    parts = ckpt_lib.path_str(p).split(".")
    stacked = parts[0] == "blocks"
    key = ".".join(parts[1:] if stacked else parts)
    if stacked:
      names = [layer_names(family, l)[key] for l in range(leaf.shape[0])]
    else:
      names = [TOP[key]]
    missing += [n for n in names if n not in folder]
    if missing:
      leaves.append(None)
      continue
    for n in names:
      want = leaf.shape[1:] if stacked else leaf.shape
      if int(np.prod(folder[n].shape)) != int(np.prod(want)):
        raise UserError(f"{path}: {n} has shape {tuple(folder[n].shape)}, which contradicts "
                        f"config.json (jmid {key} expects {want}); the folder is inconsistent")
    leaves.append(_sharded(folder, key, names, leaf, stacked))
  if missing:
    more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
    raise UserError(f"{path}: missing tensors {', '.join(missing[:3])}{more}; the folder does "
                    "not match its config.json")
  return jax.tree_util.tree_unflatten(flat[1], leaves)


def _sharded(folder: Folder, key: str, names: list[str], leaf: jax.ShapeDtypeStruct,
             stacked: bool) -> jax.Array:
  dtype = leaf.dtype

  def read(index: tuple[slice, ...]) -> np.ndarray:
    if not stacked:
      return to_jmid(key, np.asarray(folder[names[0]]), leaf.shape)[index].astype(dtype)
    layers = range(leaf.shape[0])[index[0]]
    return np.stack([to_jmid(key, np.asarray(folder[names[l]]), leaf.shape[1:])[index[1:]]
                     for l in layers]).astype(dtype)

  return jax.make_array_from_callback(leaf.shape, leaf.sharding, read)


def set_model(c: Any, path: str) -> Any:
  """For config files: model.* from the folder's config.json, and init.from_path = the folder.

  def get_config(arg=None):
    c = base.get_config(arg)
    hf.set_model(c, "/models/Qwen3-0.6B")
    ...
  """
  for k, v in model_fields(read_config(path), path).items():
    setattr(c.model, k, v)
  c.init.from_path = path
  return c


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded model: `model(tokens_bt)` -> float32 logits [B, T, vocab]."""

  cfg: ModelConfig
  params: Any
  forward: Callable[..., jax.Array]

  def __call__(self, tokens_bt: Any) -> jax.Array:
    return self.forward(self.params, jnp.asarray(tokens_bt, jnp.int32))


def load(path: str, compute_dtype: str = "float32") -> Model:
  """A HF folder as a jmid model on this process's first device."""
  from configs import base
  from jmid import config as config_lib
  c = set_model(base.get_config(), path)
  c.model.compute_dtype = compute_dtype
  c.data.demo = True  # only the model section matters here; the data section must validate
  cfg = config_lib.from_configdict(c).model
  graphdef, abstract, _ = model_lib.abstract_model(cfg)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
  params = load_params(path, target)
  forward = jax.jit(lambda p, t: model_lib.apply(graphdef, p, t))
  return Model(cfg, params, forward)


def save(model_or_checkpoint: Model | str, out_dir: str, dtype: str = "float32") -> None:
  """A HF folder from a loaded Model, or from a run's workdir / checkpoint step folder."""
  if isinstance(model_or_checkpoint, str):
    hf_write.export(model_or_checkpoint, out_dir, dtype=dtype)
    return
  m = model_or_checkpoint
  flat = jax.tree_util.tree_flatten_with_path(m.params)[0]
  leaves = ((ckpt_lib.path_str(p), np.asarray(x)) for p, x in flat)
  hf_write.write_hf(out_dir, ckpt_lib.Meta(model=dataclasses.asdict(m.cfg)), leaves, dtype)
