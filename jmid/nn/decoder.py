"""The decoder: token embedding (times sqrt(d_model) for Gemma), the layers, final norm, LM head.

Layers are created stacked (a leading `layers` axis on every weight, as checkpoints and Hugging
Face tensors number them) and applied with lax.scan over repeating groups of the layer pattern
(config.ModelConfig.pattern: Gemma 3's 5 local : 1 global is a group of 6), each layer of a
group with its kind static, so the compile holds one group whatever the depth. Layers past the
last whole group (Gemma 3 1B: 26 = 4 x 6 + 2) follow the scan, unrolled. RoPE's cos/sin are
computed once per forward pass per distinct RoPE (global, and local when it has its own base).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jmid import sharding
from jmid.config import ModelConfig
from jmid.nn import norm
from jmid.nn.attn import RopeCs
from jmid.nn.block import Block
from jmid.nn.param import param
from jmid.rope import cos_sin

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: str) -> object:
  """jax.checkpoint's policy for model.remat: a named policy, or 'save:qkv,attn' saving
  exactly the block's values of those names (config.REMAT_NAMES) and recomputing the rest."""
  if remat.startswith("save:"):
    return jax.checkpoint_policies.save_only_these_names(*remat[5:].split(","))
  return REMAT_POLICIES[remat]


def rope_tables(positions_bt: jax.Array, cfg: ModelConfig) -> dict[str, RopeCs]:
  """Each layer kind's (cos, sin): G the configured RoPE, L the unscaled local base when
  rope_local_theta is set (Gemma 3: 10k against a global 1M), N none."""
  def constrained(c: ModelConfig) -> tuple[jax.Array, jax.Array]:
    cos, sin = cos_sin(positions_bt, c)
    return (sharding.constrain(cos, ("batch", "length", None)),
            sharding.constrain(sin, ("batch", "length", None)))
  tables: dict[str, RopeCs] = {"N": None}
  if "G" in cfg.pattern or not cfg.rope_local_theta:
    tables["G"] = constrained(cfg)
  tables["L"] = constrained(dataclasses.replace(
      cfg, rope_theta=cfg.rope_local_theta, rope_scaling="none")) \
      if cfg.rope_local_theta else tables["G"]
  return tables


class Decoder(nnx.Module):
  """Token ids [B, T] -> hidden states and LM head (jmid.model makes logits and losses)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                       pd, decay="embedding")

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r: nnx.Rngs) -> Block:
      return Block(cfg, r)

    self.blocks = make_blocks(rngs)
    self.final_norm = norm.make(cfg, cfg.d_model, "embed")
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                           cfg.init_std, pd, decay="embedding")

  def __call__(self, inputs_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None,
               context_layout: str = "contiguous") -> tuple[jax.Array, jax.Array]:
    """(final-normed hidden states [B, T, E] in the compute dtype, LM head [E, vocab]).

    context_layout: the token order of the rows when the mesh splits them over `context`:
    'contiguous' is the row's own order; 'zigzag' means the caller permuted them so
    (jmid.ring.permutation), and ring attention must know where each device's chunks sit."""
    cfg = self.cfg
    cd = jnp.dtype(cfg.compute_dtype)
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(inputs_bt.shape[1]), inputs_bt.shape)
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones_like(inputs_bt)
    # the table gathered whole over fsdp first, as FSDP does for every weight: the lookup's
    # gradient then reduce-scatters into the table; left to itself, XLA re-lays the [B, T, E]
    # activations out as the table (E over fsdp, replicated over data), gathering all of them
    table_ve = sharding.constrain(self.embed[...], ("vocab", None))
    x_bte = jnp.take(table_ve, inputs_bt, axis=0).astype(cd)
    if cfg.embed_scale:
      x_bte = x_bte * jnp.asarray(cfg.d_model ** 0.5, cd)
    x_bte = sharding.constrain(x_bte, ("batch", "length", None))
    x_bte = self._layers(x_bte, rope_tables(positions_bt, cfg), segment_ids_bt, context_layout)
    x_bte = self.final_norm(x_bte)
    return x_bte, self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]

  def _layers(self, x_bte: jax.Array, rope: dict[str, RopeCs], segment_ids_bt: jax.Array,
              context_layout: str) -> jax.Array:
    cfg = self.cfg
    pattern, n = cfg.pattern, cfg.n_layers
    p = len(pattern)
    groups = n // p
    graphdef, stacked = nnx.split(self.blocks)

    def layer(x: jax.Array, states: nnx.State, j: int | None, kind: str) -> jax.Array:
      """Layer j of stacked `states` (j=None: `states` is that layer's own params)."""
      state = states if j is None else jax.tree.map(
          lambda a: checkpoint_name(a[j], "layer_params"), states)
      return nnx.merge(graphdef, state)(x, rope[kind], segment_ids_bt, kind, context_layout)

    # a layer's slice of stacked params is taken inside the checkpointed function and never
    # saved (recomputed in the backward pass): saved, it would be a second copy of every weight
    keep = jax.checkpoint_policies.save_anything_except_these_names("layer_params")
    if cfg.remat != "none" or p > 1:
      layer = jax.checkpoint(layer, prevent_cse=False, static_argnums=(2, 3),
                             policy=remat_policy(cfg.remat) if cfg.remat != "none" else keep)

    if p == 1:  # one kind: the scan hands each layer its own params
      def body(x: jax.Array, state: nnx.State) -> tuple[jax.Array, None]:
        return layer(x, state, None, pattern), None
      xs = stacked
    else:  # a group of p layers per scan step, each with its kind static
      def body(x: jax.Array, state: nnx.State) -> tuple[jax.Array, None]:
        for j, kind in enumerate(pattern):
          x = layer(x, state, j, kind)
        return x, None
      xs = jax.tree.map(lambda a: a[:groups * p].reshape(groups, p, *a.shape[1:]), stacked)
    x_bte, _ = jax.lax.scan(body, x_bte, xs, unroll=1 if cfg.scan_layers else True)
    for j in range(n - groups * p):  # the layers past the last whole group
      x_bte = layer(x_bte, stacked, groups * p + j, pattern[j])
    return x_bte
