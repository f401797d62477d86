"""Hugging Face Llama-family folders <-> jmid params.

`load(path)` gives a callable model (token ids [B, T] -> float32 logits) for notebooks and
tests; `model_fields(config_json)` is the jmid model spec a config.json describes;
`load_params(path, fields, abstract_params)` reads the weights straight onto the shardings the
abstract params carry: each device's callback reads only its layers from the memory-mapped
safetensors, so the whole model is never on one host in float32 at once.

Layouts: HF projections are [out, in] (torch Linear); jmid keeps einsum-friendly [in, heads,
head_dim] stacked over layers. RoPE needs no permutation: both use the half-split layout.
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
from jmid import model as model_lib
from jmid.config import ModelConfig
from jmid.errors import UserError
from jmid.safetensors_io import Folder

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM")


# config.json keys every supported architecture must give as positive integers
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "sliding_window")
_FLOATS = ("rms_norm_eps", "rope_theta")


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


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_keys(hf: dict[str, Any], where: str) -> None:
  """One error naming every required key that is missing or not a positive integer."""
  missing = [k for k in REQUIRED if k not in hf]
  bad = [f"{k}={hf[k]!r}" for k in REQUIRED if k in hf and not (_is_int(hf[k]) and hf[k] > 0)]
  bad += [f"{k}={hf[k]!r}" for k in _OPTIONAL_INTS
          if hf.get(k) is not None and not (_is_int(hf[k]) and hf[k] >= 0)]
  bad += [f"{k}={hf[k]!r}" for k in _FLOATS if hf.get(k) is not None and not _is_num(hf[k])]
  if missing or bad:
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"bad values {', '.join(bad)}"] if bad else [])
    raise UserError(f"{where}: {'; '.join(parts)}; a Llama-family config.json gives "
                    f"{', '.join(REQUIRED)} as positive integers: fix the file or re-save the "
                    "model with transformers")


def _rope_fields(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
  """transformers 5 `rope_parameters` or transformers 4 `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = next((t for t in (params.get("rope_theta"), hf.get("rope_theta")) if t is not None),
               10000.0)
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  p = {**scaling, **params}

  def num(key: str, default: Any = None, cast: Callable[[Any], Any] = float) -> Any:
    v = p.get(key, default)
    if not _is_num(v):
      got = "missing" if v is None else f"{v!r}, not a number"
      raise UserError(f"{where}: RoPE scaling {kind!r} needs {key} ({got}); fix "
                      "rope_parameters / rope_scaling")
    return cast(v)

  if not _is_num(theta):
    raise UserError(f"{where}: rope_theta={theta!r} is not a number")
  if kind == "default":
    return {"rope_theta": float(theta), "rope_scaling": "none"}
  if kind not in ("linear", "llama3", "yarn"):
    raise UserError(f"{where}: RoPE scaling {kind!r} is not supported; jmid supports "
                    "default, linear, llama3 and yarn")
  if kind == "yarn" and (p.get("mscale") or p.get("mscale_all_dim")):
    raise UserError(f"{where}: yarn with mscale/mscale_all_dim (DeepSeek style) is not "
                    "supported")
  out = {"rope_theta": float(theta), "rope_scaling": kind, "rope_factor": num("factor")}
  if kind in ("llama3", "yarn"):
    out["rope_original_max_len"] = num("original_max_position_embeddings", cast=int)
  if kind == "llama3":
    out.update(rope_low_freq_factor=num("low_freq_factor", 1.0),
               rope_high_freq_factor=num("high_freq_factor", 4.0))
  if kind == "yarn":
    out.update(rope_beta_fast=float(p.get("beta_fast") or 32.0),
               rope_beta_slow=float(p.get("beta_slow") or 1.0),
               rope_attention_factor=float(p.get("attention_factor") or 0.0))
  return out


def model_fields(hf: dict[str, Any], path: str = "") -> dict[str, Any]:
  """The ModelConfig fields a HF config.json fixes (everything but dtypes, remat, attention).

  `path` is the folder, for error messages; every problem is one UserError naming the file.
  """
  where = os.path.join(path, "config.json") if path else "config.json"
  if not isinstance(hf, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(hf).__name__}")
  arch = (hf.get("architectures") or ["?"])[0]
  if arch not in ARCHITECTURES:
    raise UserError(f"{where}: architecture {arch} is not supported; jmid reads "
                    f"{', '.join(ARCHITECTURES)}")
  _check_keys(hf, where)
  if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
    raise UserError(f"{where}: {arch} with hidden_act={hf.get('hidden_act')} / mlp_bias "
                    "is not the SwiGLU jmid implements")
  if arch in ("LlamaForCausalLM", "MistralForCausalLM") and hf.get("attention_bias"):
    raise UserError(f"{where}: {arch} with attention_bias (an o_proj bias too) is not "
                    "supported")
  if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
    raise UserError(f"{where}: Qwen2 with use_sliding_window (windowed layers above "
                    "max_window_layers only) is not supported")
  window = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
  heads = hf["num_attention_heads"]
  return {
      "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
      "n_layers": hf["num_hidden_layers"], "n_heads": heads,
      "n_kv_heads": hf.get("num_key_value_heads") or heads,
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "d_ff": hf["intermediate_size"], "norm_eps": float(hf.get("rms_norm_eps") or 1e-6),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      "qkv_bias": arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias")),
      "qk_norm": arch == "Qwen3ForCausalLM", "sliding_window": int(window or 0),
      **_rope_fields(hf, where)}


def contradictions(model: ModelConfig, hf: dict[str, Any], path: str = "") -> list[str]:
  """`model.k=v (config.json: w)` for every model.* field that differs from what the folder's
  config.json fixes; head_dim compares the resolved width (0 means d_model // n_heads)."""
  out = []
  for k, want in model_fields(hf, path).items():
    have = getattr(model, k)
    if k == "head_dim" and model.dh == want:
      continue
    if have != want:
      note = f" (= {model.dh})" if k == "head_dim" and have == 0 else ""
      out.append(f"model.{k}={have!r}{note} (config.json: {want!r})")
  return out


def _layer_names(l: int) -> dict[str, str]:
  p = f"model.layers.{l}."
  return {"attn_norm.scale": p + "input_layernorm.weight",
          "mlp_norm.scale": p + "post_attention_layernorm.weight",
          "wq": p + "self_attn.q_proj.weight", "wk": p + "self_attn.k_proj.weight",
          "wv": p + "self_attn.v_proj.weight", "wo": p + "self_attn.o_proj.weight",
          "bq": p + "self_attn.q_proj.bias", "bk": p + "self_attn.k_proj.bias",
          "bv": p + "self_attn.v_proj.bias", "q_norm.scale": p + "self_attn.q_norm.weight",
          "k_norm.scale": p + "self_attn.k_norm.weight", "w_gate": p + "mlp.gate_proj.weight",
          "w_up": p + "mlp.up_proj.weight", "w_down": p + "mlp.down_proj.weight"}


TOP = {"embed": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight",
       "lm_head": "lm_head.weight"}


def to_jmid(key: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """One HF tensor -> the jmid layout of `key` (one layer's slice for stacked weights)."""
  if key in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"):
    return a.T.reshape(shape)  # torch Linear [out, in] -> [in, ...]; wo: [heads, hd, embed]
  return a.reshape(shape)


def from_jmid(key: str, a: np.ndarray) -> np.ndarray:
  """The inverse of to_jmid: a jmid array (one layer) -> the HF tensor."""
  if key in ("wq", "wk", "wv"):
    return a.reshape(a.shape[0], -1).T
  if key == "wo":
    return a.reshape(-1, a.shape[-1]).T
  if key in ("w_gate", "w_up", "w_down", "lm_head"):
    return a.T
  if key in ("bq", "bk", "bv"):
    return a.reshape(-1)
  return a


def load_params(path: str, abstract_params: Any) -> Any:
  """Params from a HF folder onto the shardings in `abstract_params` (ShapeDtypeStructs)."""
  folder = Folder(path)
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)
  missing: list[str] = []
  leaves = []
  for p, leaf in flat[0]:
    parts = ckpt_lib.path_str(p).split(".")
    stacked = parts[0] == "blocks"
    key = ".".join(parts[1:] if stacked else parts)
    if stacked:
      names = [_layer_names(l)[key] for l in range(leaf.shape[0])]
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
  from jmid import export
  if isinstance(model_or_checkpoint, str):
    export.export(model_or_checkpoint, out_dir, dtype=dtype)
    return
  m = model_or_checkpoint
  flat = jax.tree_util.tree_flatten_with_path(m.params)[0]
  leaves = ((ckpt_lib.path_str(p), np.asarray(x)) for p, x in flat)
  export.write_hf(out_dir, {"model": dataclasses.asdict(m.cfg)}, leaves, dtype)
