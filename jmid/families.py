"""The model families jmid reads from and writes to Hugging Face, each in one place: its
architecture and model_type, the model.* switches it fixes (biases, q/k norm, norm style and
placement, MLP activation, embedding scale), how its config.json gives the layers' kinds and
RoPE, config.json -> model.* and back, and the tensor-name table.

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


# The model.* switches a family fixes, at jmid's defaults (a checkpoint from before a switch
# existed has the default); a family overrides some of them.
SWITCH_DEFAULTS: dict[str, Any] = {
    "qkv_bias": False, "qk_norm": False, "qk_norm_scope": "head", "norm_style": "llama",
    "norm_placement": "pre", "mlp_activation": "silu", "embed_scale": False}
_GEMMA = {"norm_style": "gemma", "norm_placement": "pre_post", "mlp_activation": "gelu_tanh",
          "embed_scale": True}
_OLMO = {"norm_style": "olmo", "norm_placement": "post", "qk_norm": True,
         "qk_norm_scope": "projection"}


@dataclasses.dataclass(frozen=True)
class Family:
  """What a family fixes of the model; the rest (widths, RoPE, layers, tying) comes from its
  config.json."""

  name: str
  architecture: str  # config.json's architectures[0]
  model_type: str
  switches: tuple[tuple[str, Any], ...] = ()  # SWITCH_DEFAULTS it overrides
  # how config.json gives the layers' kinds: none (all global), window (Mistral: one
  # sliding_window for every layer), types (layer_types: sliding / full), nope (SmolLM3's
  # no_rope_layers)
  layers: str = "none"
  local_rope: bool = False  # local layers have a RoPE of their own (rope_parameters by type)
  gemma_attention: bool = False  # query_pre_attn_scalar and logit softcaps
  default_theta: float = 10000.0
  default_local_theta: float = 0.0  # config.json without a local base (Gemma 3: 10k)
  period: int = 0  # the sliding_window_pattern of a config.json without layer_types
  default_window: int = 0  # the sliding_window of a config.json without one
  norms: str = "llama"  # which HF names the layer norms carry (_NORM_NAMES)

  @property
  def fixed(self) -> dict[str, Any]:
    return {**SWITCH_DEFAULTS, **dict(self.switches)}


def _family(name: str, architecture: str, model_type: str, switches: dict[str, Any] | None = None,
            **kw: Any) -> Family:
  return Family(name, architecture, model_type, tuple(sorted((switches or {}).items())), **kw)


FAMILIES = {f.name: f for f in (
    _family("llama", "LlamaForCausalLM", "llama"),
    _family("mistral", "MistralForCausalLM", "mistral", layers="window"),
    _family("qwen2", "Qwen2ForCausalLM", "qwen2", {"qkv_bias": True}),
    _family("qwen3", "Qwen3ForCausalLM", "qwen3", {"qk_norm": True}),
    _family("gemma2", "Gemma2ForCausalLM", "gemma2", _GEMMA, layers="types",
            gemma_attention=True, period=2, default_window=4096, norms="gemma"),
    _family("gemma3", "Gemma3ForCausalLM", "gemma3_text", {**_GEMMA, "qk_norm": True},
            layers="types", local_rope=True, gemma_attention=True, default_theta=1e6,
            default_local_theta=1e4, period=6, default_window=4096, norms="gemma"),
    _family("olmo2", "Olmo2ForCausalLM", "olmo2", _OLMO, norms="olmo"),
    _family("olmo3", "Olmo3ForCausalLM", "olmo3", _OLMO, layers="types", local_rope=True,
            default_theta=5e5, period=4, default_window=4096, norms="olmo"),
    _family("smollm3", "SmolLM3ForCausalLM", "smollm3", layers="nope", default_theta=2e6),
)}
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}
ARCHITECTURES = tuple(sorted(BY_ARCHITECTURE))
NAMES = ("", *FAMILIES)  # model.family's choices; "" = none (see the module docstring)
_HAS = {"qkv_bias": "q/k/v biases", "qk_norm": "q/k norm", "embed_scale": "scaled embeddings"}


def mismatch(family: str, m: dict[str, Any]) -> str:
  """Why model spec `m` (ModelConfig fields) is not of `family` ("" when it is, or has none)."""
  if not family:
    return ""
  f = FAMILIES[family]
  arch = f.architecture
  for k, want in f.fixed.items():
    have = m.get(k, SWITCH_DEFAULTS[k])
    if have != want:
      if k in _HAS:
        return f"model.{k}={have}, but {arch} has {'' if want else 'no '}{_HAS[k]}"
      return f"model.{k}={have!r}, but {arch} has {k}={want!r}"
  kinds, window = set(m.get("layer_pattern") or ""), m.get("sliding_window") or 0
  if f.layers in ("none", "nope") and (window or "L" in kinds):
    return f"model.sliding_window={window}, but {arch} has no sliding window"
  if f.layers == "window" and kinds - {"G"}:
    return f"model.layer_pattern={m['layer_pattern']!r}, but {arch} has one kind of layer"
  if f.layers != "nope" and "N" in kinds:
    return f"model.layer_pattern={m['layer_pattern']!r}, but {arch} has no layers without RoPE"
  if not f.local_rope and m.get("rope_local_theta"):
    return f"model.rope_local_theta={m['rope_local_theta']}, but {arch} has one RoPE"
  for k in ("query_scale", "attn_softcap", "final_softcap"):
    if m.get(k) and not f.gemma_attention:
      return f"model.{k}={m[k]}, but {arch} has no {k}"
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


def _rope_fields(hf: dict[str, Any], where: str = "config.json",
                 default_theta: float = 10000.0) -> dict[str, Any]:
  """transformers 5 `rope_parameters` or transformers 4 `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = next((t for t in (params.get("rope_theta"), hf.get("rope_theta")) if t is not None),
               default_theta)
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  p = {**scaling, **params}
  if p.get("partial_rotary_factor", 1.0) != 1.0:
    raise UserError(f"{where}: partial_rotary_factor={p['partial_rotary_factor']} (RoPE on "
                    "part of each head) is not supported")

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


_TYPES = {"full_attention": "G", "sliding_attention": "L"}


def period_of(kinds: str) -> str:
  """The shortest group that, repeated and cut to length, gives `kinds` (per-layer kinds)."""
  return next(kinds[:p] for p in range(1, len(kinds) + 1)
              if all(k == kinds[i % p] for i, k in enumerate(kinds)))


def _layer_fields(f: Family, hf: dict[str, Any], where: str) -> dict[str, Any]:
  """model.layer_pattern / sliding_window / rope fields from the family's way of giving the
  layers' kinds and RoPE."""
  n, arch = hf["num_hidden_layers"], f.architecture
  types = hf.get("layer_types")
  if f.layers in ("none", "nope") and isinstance(types, list) and "sliding_attention" in types:
    raise UserError(f"{where}: {arch} with sliding_attention layers (layer_types) is not "
                    "supported")
  if f.layers == "types" and types is not None and (
      not isinstance(types, list) or len(types) != n or any(t not in _TYPES for t in types)):
    raise UserError(f"{where}: layer_types must list full_attention / sliding_attention for "
                    f"each of the {n} layers, got {types!r}")
  if f.layers == "window":
    return {"layer_pattern": "", "sliding_window": int(hf.get("sliding_window") or 0),
            **_rope_fields(hf, where, f.default_theta)}
  if f.layers == "nope":
    flags = hf.get("no_rope_layers")
    if flags is None:
      every = hf.get("no_rope_layer_interval", 4)
      flags = [int((i + 1) % every != 0) for i in range(n)]
    if not isinstance(flags, list) or len(flags) != n or any(x not in (0, 1) for x in flags):
      raise UserError(f"{where}: no_rope_layers must give 0 or 1 for each of the {n} layers, "
                      f"got {flags!r}")
    kinds = "".join("G" if x else "N" for x in flags)
    return {"layer_pattern": "" if "N" not in kinds else period_of(kinds),
            "sliding_window": 0, **_rope_fields(hf, where, f.default_theta)}
  if f.layers == "none":
    return {"layer_pattern": "", "sliding_window": 0, **_rope_fields(hf, where, f.default_theta)}
  if types is None:
    every = hf.get("sliding_window_pattern", f.period)
    types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
  kinds = "".join(_TYPES[t] for t in types)
  window = hf.get("sliding_window", f.default_window) or 0
  if "L" in kinds and not window:
    raise UserError(f"{where}: sliding_attention layers need sliding_window, which is missing")
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params or "sliding_attention" in params:  # one RoPE per layer kind
    full = {**hf, "rope_parameters": params.get("full_attention") or {}}
    local = params.get("sliding_attention") or {}
  else:  # transformers 4: rope_theta (+ rope_scaling) global, rope_local_base_freq local
    full = hf
    local = {"rope_theta": hf.get("rope_local_base_freq")}
  rope = _rope_fields(full, where, f.default_theta)
  out = {"layer_pattern": period_of(kinds), "sliding_window": int(window if "L" in kinds else 0),
         **rope}
  if f.local_rope:
    if (local.get("rope_type") or "default") != "default":
      raise UserError(f"{where}: RoPE scaling {local['rope_type']!r} on the sliding layers is "
                      "not supported (jmid scales the full-attention layers' RoPE only)")
    theta = local.get("rope_theta") or f.default_local_theta or rope["rope_theta"]
    out["rope_local_theta"] = float(theta)
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
  fam = BY_ARCHITECTURE[arch]
  fixed = fam.fixed
  act_key, act = _ACTIVATION[fixed["mlp_activation"]]
  if hf.get(act_key, act) != act or hf.get("mlp_bias"):
    raise UserError(f"{where}: {arch} with {act_key}={hf.get(act_key)!r} / mlp_bias is not "
                    f"the gated MLP jmid implements ({act_key}={act!r}, no bias)")
  if hf.get("attention_bias") and not fixed["qkv_bias"]:  # Qwen2's biases are fixed, not this
    raise UserError(f"{where}: {arch} with attention_bias (an o_proj bias too) is not "
                    "supported")
  if hf.get("use_sliding_window") and fam.layers != "window":
    raise UserError(f"{where}: {arch} with use_sliding_window (windowed layers above "
                    "max_window_layers only) is not supported")
  if hf.get("use_bidirectional_attention"):
    raise UserError(f"{where}: {arch} with use_bidirectional_attention (an encoder) is not "
                    "supported; jmid trains causal decoders")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  out = {
      "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
      "n_layers": hf["num_hidden_layers"], "n_heads": heads,
      "n_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": head_dim,
      "d_ff": hf["intermediate_size"], "norm_eps": float(hf.get("rms_norm_eps") or 1e-6),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      **fixed, "family": fam.name, "rope_local_theta": 0.0,
      "query_scale": 0.0, "attn_softcap": 0.0, "final_softcap": 0.0,
      **_layer_fields(fam, hf, where)}
  if fam.gemma_attention:
    scalar = hf.get("query_pre_attn_scalar", 256)
    caps = {k: hf.get(k) or 0.0 for k in ("attn_logit_softcapping", "final_logit_softcapping")}
    bad = [f"{k}={v!r}" for k, v in {"query_pre_attn_scalar": scalar, **caps}.items()
           if not (_is_num(v) and v >= 0)]
    if bad:
      raise UserError(f"{where}: bad values {', '.join(bad)}; they must be numbers >= 0")
    out.update(query_scale=0.0 if scalar == head_dim else float(scalar),
               attn_softcap=float(caps["attn_logit_softcapping"]),
               final_softcap=float(caps["final_logit_softcapping"]))
  return out


# config.json's MLP activation key and value for model.mlp_activation
_ACTIVATION = {"silu": ("hidden_act", "silu"), "gelu_tanh": ("hidden_activation",
                                                              "gelu_pytorch_tanh")}


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


def _layer_keys(f: Family, m: dict[str, Any]) -> dict[str, Any]:
  """config.json's keys for the layers' kinds and RoPE, in both transformers' forms."""
  legacy, params = _rope(m)
  kinds = (m.get("layer_pattern") or "G") * m["n_layers"]
  kinds = kinds[:m["n_layers"]]
  window = m.get("sliding_window") or None
  if f.layers in ("none", "window"):
    return {"rope_theta": m["rope_theta"], "rope_scaling": legacy, "rope_parameters": params,
            "sliding_window": window, "use_sliding_window": False}
  if f.layers == "nope":
    return {"rope_theta": m["rope_theta"], "rope_scaling": legacy, "rope_parameters": params,
            "no_rope_layers": [int(k != "N") for k in kinds], "use_sliding_window": False,
            "sliding_window": None}
  names = {v: k for k, v in _TYPES.items()}
  out = {"layer_types": [names[k] for k in kinds], "sliding_window": window,
         "rope_theta": m["rope_theta"], "rope_scaling": legacy}
  if not f.local_rope:
    return {**out, "rope_parameters": params}
  local = m.get("rope_local_theta") or m["rope_theta"]
  out["rope_parameters"] = {"full_attention": params, "sliding_attention": {
      "rope_type": "default", "rope_theta": local}}
  if f.name == "gemma3":  # transformers 4's keys for them
    out.update(rope_local_base_freq=local, sliding_window_pattern=len(m.get("layer_pattern")
                                                                      or "G"))
  return out


def hf_config(m: dict[str, Any], seq_len: int, dtype: str) -> dict[str, Any]:
  """The config.json of model spec `m` (a ModelConfig as a dict) trained at seq_len."""
  fam = family_of(m)
  problem = mismatch(fam.name, m)
  if problem:
    raise UserError(f"cannot write a Hugging Face config.json: {problem}")
  max_len = max(seq_len, int(m.get("rope_original_max_len", 0) * m.get("rope_factor", 1.0)))
  head_dim = m["head_dim"] or m["d_model"] // m["n_heads"]
  act_key, act = _ACTIVATION[fam.fixed["mlp_activation"]]
  out = {
      "architectures": [fam.architecture], "model_type": fam.model_type,
      "vocab_size": m["vocab_size"], "hidden_size": m["d_model"],
      "intermediate_size": m["d_ff"], "num_hidden_layers": m["n_layers"],
      "num_attention_heads": m["n_heads"], "num_key_value_heads": m["n_kv_heads"],
      "head_dim": head_dim, act_key: act, "max_position_embeddings": max_len,
      "rms_norm_eps": m["norm_eps"], "tie_word_embeddings": m["tie_embeddings"],
      "attention_bias": bool(m["qkv_bias"]),
      "attention_dropout": 0.0, "use_cache": True, "initializer_range": 0.02,
      # no token ids: the tokenizer files carry them, and a family's defaults (SmolLM3 pads
      # with 128004) would index past a smaller vocabulary
      "pad_token_id": None,
      **_layer_keys(fam, m), "torch_dtype": dtype, "dtype": dtype,
  }
  if fam.gemma_attention:
    scalar = m.get("query_scale") or head_dim
    out.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
               attn_logit_softcapping=m.get("attn_softcap") or None,
               final_logit_softcapping=m.get("final_softcap") or None)
  return out


# tensor names and layouts: jmid params keys below `blocks` (one layer) and above it

_NORM_NAMES = {
    "llama": {"attn_norm.scale": "input_layernorm", "mlp_norm.scale": "post_attention_layernorm"},
    "gemma": {"attn_norm.scale": "input_layernorm",
              "attn_post_norm.scale": "post_attention_layernorm",
              "mlp_norm.scale": "pre_feedforward_layernorm",
              "mlp_post_norm.scale": "post_feedforward_layernorm"},
    "olmo": {"attn_post_norm.scale": "post_attention_layernorm",
             "mlp_post_norm.scale": "post_feedforward_layernorm"},
}
_LAYER = {"attn.wq": "self_attn.q_proj.weight", "attn.wk": "self_attn.k_proj.weight",
          "attn.wv": "self_attn.v_proj.weight", "attn.wo": "self_attn.o_proj.weight",
          "attn.bq": "self_attn.q_proj.bias", "attn.bk": "self_attn.k_proj.bias",
          "attn.bv": "self_attn.v_proj.bias", "attn.q_norm.scale": "self_attn.q_norm.weight",
          "attn.k_norm.scale": "self_attn.k_norm.weight", "mlp.w_gate": "mlp.gate_proj.weight",
          "mlp.w_up": "mlp.up_proj.weight", "mlp.w_down": "mlp.down_proj.weight"}


def layer_names(f: Family, l: int) -> dict[str, str]:
  """jmid key of one layer's weight -> its HF tensor name in layer l."""
  p = f"model.layers.{l}."
  norms = {k: v + ".weight" for k, v in _NORM_NAMES[f.norms].items()}
  return {k: p + v for k, v in {**_LAYER, **norms}.items()}


TOP = {"embed": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight",
       "lm_head": "lm_head.weight"}
_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")


def to_jmid(key: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """One HF tensor -> the jmid layout of `key` (one layer's slice for stacked weights)."""
  if key.split(".")[-1] in _MATRICES:
    return a.T.reshape(shape)  # torch Linear [out, in] -> [in, ...]; wo: [heads, hd, embed]
  return a.reshape(shape)  # biases and OLMo's whole-projection q/k norms: [heads * hd]


def from_jmid(key: str, a: np.ndarray) -> np.ndarray:
  """The inverse of to_jmid: a jmid array (one layer) -> the HF tensor."""
  last = key.split(".")[-1]
  if last in ("wq", "wk", "wv"):
    return a.reshape(a.shape[0], -1).T
  if last == "wo":
    return a.reshape(-1, a.shape[-1]).T
  if last in _MATRICES:
    return a.T
  if last in ("bq", "bk", "bv", "scale"):
    return a.reshape(-1)
  return a
