"""One layer: attention then MLP, each added to the residual stream, with norms placed as the
family places them (config.NORM_PLACEMENTS): before (Llama), before and after (Gemma), or
after only (OLMo 2/3)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jmid import sharding
from jmid.config import ModelConfig
from jmid.nn import norm
from jmid.nn.attn import Attention, RopeCs
from jmid.nn.mlp import Mlp


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pre, post = cfg.norm_placement in ("pre", "pre_post"), cfg.norm_placement != "pre"
    if pre:
      self.attn_norm = norm.make(cfg, cfg.d_model, "embed")
    self.attn = Attention(cfg, rngs)
    if post:
      self.attn_post_norm = norm.make(cfg, cfg.d_model, "embed")
    if pre:
      self.mlp_norm = norm.make(cfg, cfg.d_model, "embed")
    self.mlp = Mlp(cfg, rngs)
    if post:
      self.mlp_post_norm = norm.make(cfg, cfg.d_model, "embed")

  def __call__(self, x_bte: jax.Array, rope_cs: RopeCs, segment_ids_bt: jax.Array, kind: str,
               context_layout: str = "contiguous") -> jax.Array:
    h = self.attn_norm(x_bte) if hasattr(self, "attn_norm") else x_bte
    h = self.attn(h, rope_cs, segment_ids_bt, kind, context_layout)
    if hasattr(self, "attn_post_norm"):
      h = self.attn_post_norm(h)
    x_bte = sharding.constrain(x_bte + checkpoint_name(h, "attn_out"), ("batch", "length", None))
    h = self.mlp_norm(x_bte) if hasattr(self, "mlp_norm") else x_bte
    h = self.mlp(h)
    if hasattr(self, "mlp_post_norm"):
      h = self.mlp_post_norm(h)
    return sharding.constrain(x_bte + checkpoint_name(h, "mlp_out"), ("batch", "length", None))
