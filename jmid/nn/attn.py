"""Self-attention as a module: q/k/v projections (with biases for Qwen2), q/k norm per head
(Qwen3, Gemma 3) or over the whole projection (OLMo 2/3), RoPE from the cos/sin the decoder
computed once for the layer's kind, the attention call (jmid.attention: the kernel, cuDNN, XLA
or ring), and the output projection. The layer's kind (config.LAYER_KINDS) is static: a local
layer passes the window down to the kernel's block skipping, an N layer skips RoPE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jmid import attention as attention_lib
from jmid import sharding
from jmid.config import ModelConfig
from jmid.nn.norm import RMSNorm
from jmid.nn.param import param
from jmid.rope import apply_rope

RopeCs = tuple[jax.Array, jax.Array] | None


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    e, h, k, d = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dh
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.wq = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), std, pd)
    self.wk = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wv = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wo = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), out_std, pd)
    if cfg.qkv_bias:
      self.bq = param(None, (h, d), ("heads", "head_dim"), 0.0, pd, decay="none")
      self.bk = param(None, (k, d), ("kv_heads", "head_dim"), 0.0, pd, decay="none")
      self.bv = param(None, (k, d), ("kv_heads", "head_dim"), 0.0, pd, decay="none")
    if cfg.qk_norm:
      whole = cfg.qk_norm_scope == "projection"
      q_shape, k_shape = ((h, d), (k, d)) if whole else ((d,), (d,))
      q_names = ("heads", "head_dim") if whole else ("head_dim",)
      k_names = ("kv_heads", "head_dim") if whole else ("head_dim",)
      self.q_norm = RMSNorm(q_shape, q_names, cfg.norm_eps, cfg.norm_style, pd)
      self.k_norm = RMSNorm(k_shape, k_names, cfg.norm_eps, cfg.norm_style, pd)

  def __call__(self, h_bte: jax.Array, rope_cs: RopeCs, segment_ids_bt: jax.Array, kind: str,
               context_layout: str = "contiguous") -> jax.Array:
    cfg, cd = self.cfg, h_bte.dtype
    q = jnp.einsum("bte,ehd->bthd", h_bte, self.wq[...].astype(cd))
    k = jnp.einsum("bte,ehd->bthd", h_bte, self.wk[...].astype(cd))
    v = jnp.einsum("bte,ehd->bthd", h_bte, self.wv[...].astype(cd))
    if cfg.qkv_bias:
      q, k, v = (q + self.bq[...].astype(cd), k + self.bk[...].astype(cd),
                 v + self.bv[...].astype(cd))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope_cs is not None:
      q, k = apply_rope(q, rope_cs), apply_rope(k, rope_cs)
    q = sharding.constrain(q, ("batch", "length", "heads", None))
    k = sharding.constrain(k, ("batch", "length", "kv_heads", None))
    q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
    # 'auto' is chosen by build.setup for the mesh; a model built elsewhere (hf.load, passkey)
    # chooses for the devices it runs on
    impl = cfg.attention if cfg.attention != "auto" else attention_lib.choose(
        cfg, jax.devices()[0], sharding.context_size())
    o_bthd = attention_lib.attention(
        q, k, v, segment_ids_bt, implementation=impl,
        window=cfg.sliding_window if kind == "L" else 0, layout=context_layout,
        max_docs=cfg.cudnn_max_docs, scale=cfg.query_scale ** -0.5 if cfg.query_scale else None,
        softcap=cfg.attn_softcap)
    o_bthd = checkpoint_name(o_bthd, "attn")
    return jnp.einsum("bthd,hde->bte", o_bthd, self.wo[...].astype(cd))
