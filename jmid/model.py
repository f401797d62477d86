"""The model as the train step and the tools use it: pure functions over a params dict.

The modules are in jmid/nn (param, norm, attn, mlp, block, decoder). Weights are stored in
einsum-friendly layouts (q: [embed, heads, head_dim]) and carry logical axis names as metadata
(`sharding_names`, eager sharding off), so the model never needs a mesh to be built;
sharding.py turns the names into shardings.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jmid import loss as loss_lib
from jmid import sharding
from jmid.config import ModelConfig
from jmid.nn.decoder import Decoder


@functools.lru_cache(maxsize=8)
def _abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model traced once per config (shapes only), for every reader below."""
  return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))


def _metadata(cfg: ModelConfig, key: str) -> dict:
  return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()[key], _abstract(cfg)[1],
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, abstract params as a pure dict, logical names as a matching dict); no memory."""
  graphdef, state = _abstract(cfg)
  return graphdef, nnx.to_pure_dict(state), _metadata(cfg, "out_sharding")


def decay_kinds(cfg: ModelConfig) -> dict:
  """Each parameter's weight-decay kind (nn.param) as a pure dict matching the params."""
  return _metadata(cfg, "decay")


def init_params(cfg: ModelConfig, seed: int) -> dict:
  """Random params as a pure dict (call under jit with out_shardings to create them sharded)."""
  return nnx.to_pure_dict(nnx.state(Decoder(cfg, nnx.Rngs(seed))))


def apply(graphdef: nnx.GraphDef, params: dict, inputs_bt: jax.Array,
          positions_bt: jax.Array | None = None,
          segment_ids_bt: jax.Array | None = None,
          context_layout: str = "contiguous") -> jax.Array:
  """Pure forward pass over a params dict: float32 logits [B, T, vocab], softcapped as the
  model asks."""
  model = nnx.merge(graphdef, params)
  x_bte, head_ev = model(inputs_bt, positions_bt, segment_ids_bt, context_layout)
  logits = loss_lib.logits(x_bte, head_ev, model.cfg.final_softcap)
  return sharding.constrain(logits, ("batch", "length", "vocab"))


def hidden(graphdef: nnx.GraphDef, params: dict, inputs_bt: jax.Array,
           positions_bt: jax.Array, segment_ids_bt: jax.Array,
           context_layout: str = "contiguous") -> tuple[jax.Array, jax.Array, float]:
  """(final-normed hidden states, LM head, the logits' softcap): what the logits are made of,
  for a loss that computes them in chunks (jmid.loss)."""
  model = nnx.merge(graphdef, params)
  x_bte, head_ev = model(inputs_bt, positions_bt, segment_ids_bt, context_layout)
  return x_bte, head_ev, model.cfg.final_softcap


def count_params(params: dict) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
