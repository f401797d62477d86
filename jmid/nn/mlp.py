"""The gated MLP: down(act(gate(x)) * up(x)), SwiGLU (silu) or GeGLU (tanh-approximated gelu,
Gemma's gelu_pytorch_tanh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jmid import sharding
from jmid.config import ModelConfig
from jmid.nn.param import param

ACTIVATIONS = {"silu": jax.nn.silu,
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.activation = cfg.mlp_activation
    pd, e, f = jnp.dtype(cfg.param_dtype), cfg.d_model, cfg.d_ff
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.w_gate = param(rngs, (e, f), ("embed", "mlp"), std, pd)
    self.w_up = param(rngs, (e, f), ("embed", "mlp"), std, pd)
    self.w_down = param(rngs, (f, e), ("mlp", "embed"), out_std, pd)

  def __call__(self, h_bte: jax.Array) -> jax.Array:
    cd = h_bte.dtype
    gate_btf = jnp.einsum("bte,ef->btf", h_bte, self.w_gate[...].astype(cd))
    up_btf = jnp.einsum("bte,ef->btf", h_bte, self.w_up[...].astype(cd))
    act_btf = ACTIVATIONS[self.activation](gate_btf) * up_btf
    act_btf = checkpoint_name(sharding.constrain(act_btf, ("batch", "length", "mlp")),
                              "mlp_hidden")
    return jnp.einsum("btf,fe->bte", act_btf, self.w_down[...].astype(cd))
