"""The model families jmid reads from and writes to Hugging Face, each in one place: its
architecture and model_type, what it fixes of the model (q/k/v biases, q/k norm, a sliding
window), config.json -> model.* and back, and the tensor-name table.

`model.family` names one (set by `hf.set_model` from a folder's config.json); "" is a jmid
model of no family, exported as the family its switches match. Checkpoints written before
`model.family` existed read as "" too (`family_of`).

Layouts: HF projections are [out, in] (torch Linear); jmid keeps einsum-friendly [in, heads,
head_dim] stacked over layers. RoPE needs no permutation: both use the half-split layout.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from jmid.errors import UserError


@dataclasses.dataclass(frozen=True)
class Family:
  """What a family fixes of the model; the rest (widths, RoPE, tying) comes from config.json."""

  name: str
  architecture: str  # config.json's architectures[0]
  model_type: str
  qkv_bias: bool  # q/k/v projections carry biases (Qwen2)
  qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
  window: bool  # config.json's sliding_window applies to every layer (Mistral)


FAMILIES = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", "llama", qkv_bias=False, qk_norm=False, window=False),
    Family("mistral", "MistralForCausalLM", "mistral", qkv_bias=False, qk_norm=False,
           window=True),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True, qk_norm=False, window=False),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_norm=True, window=False),
)}
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}
ARCHITECTURES = tuple(sorted(BY_ARCHITECTURE))
NAMES = ("", *FAMILIES)  # model.family's choices; "" = none (see the module docstring)


def mismatch(family: str, qkv_bias: bool, qk_norm: bool, sliding_window: int) -> str:
  """Why a model with these switches is not of `family` ("" when it is, or has no family)."""
  if not family:
    return ""
  f = FAMILIES[family]
  has = {True: "has", False: "has no"}
  if qkv_bias != f.qkv_bias:
    return f"model.qkv_bias={qkv_bias}, but {f.architecture} {has[f.qkv_bias]} q/k/v biases"
  if qk_norm != f.qk_norm:
    return f"model.qk_norm={qk_norm}, but {f.architecture} {has[f.qk_norm]} q/k norm"
  if sliding_window and not f.window:
    return f"model.sliding_window={sliding_window}, but {f.architecture} has no sliding window"
  return ""


def family_of(m: dict[str, Any]) -> Family:
  """A model spec's family; with none ("", or a checkpoint from before model.family), the one
  its switches match: Qwen3 for q/k norm, Qwen2 for q/k/v biases, Mistral for a sliding
  window, else Llama."""
  if m.get("family"):
    return FAMILIES[m["family"]]
  if m.get("qk_norm"):
    return FAMILIES["qwen3"]
  if m.get("qkv_bias"):
    return FAMILIES["qwen2"]
  return FAMILIES["mistral" if m.get("sliding_window") else "llama"]


# config.json -> model.*

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "sliding_window")
_FLOATS = ("rms_norm_eps", "rope_theta")


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
  if arch not in BY_ARCHITECTURE:
    raise UserError(f"{where}: architecture {arch} is not supported; jmid reads "
                    f"{', '.join(ARCHITECTURES)}")
  _check_keys(hf, where)
  if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
    raise UserError(f"{where}: {arch} with hidden_act={hf.get('hidden_act')} / mlp_bias "
                    "is not the SwiGLU jmid implements")
  fam = BY_ARCHITECTURE[arch]
  if hf.get("attention_bias") and not fam.qkv_bias:  # Qwen2's biases are fixed, not this key
    raise UserError(f"{where}: {arch} with attention_bias (an o_proj bias too) is not "
                    "supported")
  if hf.get("use_sliding_window") and not fam.window:
    raise UserError(f"{where}: {arch} with use_sliding_window (windowed layers above "
                    "max_window_layers only) is not supported")
  window = hf.get("sliding_window") if fam.window else None
  heads = hf["num_attention_heads"]
  return {
      "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
      "n_layers": hf["num_hidden_layers"], "n_heads": heads,
      "n_kv_heads": hf.get("num_key_value_heads") or heads,
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "d_ff": hf["intermediate_size"], "norm_eps": float(hf.get("rms_norm_eps") or 1e-6),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      "qkv_bias": fam.qkv_bias, "qk_norm": fam.qk_norm, "sliding_window": int(window or 0),
      "family": fam.name,
      **_rope_fields(hf, where)}




# model.* -> config.json

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


def hf_config(m: dict[str, Any], seq_len: int, dtype: str) -> dict[str, Any]:
  """The config.json of model spec `m` (a ModelConfig as a dict) trained at seq_len."""
  fam = family_of(m)
  problem = mismatch(fam.name, bool(m["qkv_bias"]), bool(m["qk_norm"]),
                     int(m.get("sliding_window") or 0))
  if problem:
    raise UserError(f"cannot write a Hugging Face config.json: {problem}")
  arch = fam.architecture
  legacy, params = _rope(m)
  max_len = max(seq_len, int(m.get("rope_original_max_len", 0) * m.get("rope_factor", 1.0)))
  head_dim = m["head_dim"] or m["d_model"] // m["n_heads"]
  return {
      "architectures": [arch], "model_type": fam.model_type,
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


# tensor names and layouts

def layer_names(l: int) -> dict[str, str]:
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
