"""Decoder-only Llama-family transformer (Llama / Qwen2 / Qwen3 / Mistral) in Flax NNX.

Weights are stored in einsum-friendly layouts (q: [embed, heads, head_dim]) and carry logical
axis names as metadata (`sharding_names`, eager sharding off), so the model never needs a mesh
to be built; sharding.py turns the names into shardings. Blocks are created stacked (leading
`layers` axis) and applied with lax.scan under an optional remat policy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jmid import attention as attention_lib
from jmid import loss as loss_lib
from jmid import sharding
from jmid.config import ModelConfig
from jmid.rope import apply_rope, cos_sin

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


def _param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Sequence[str | None],
           std: float | None, dtype: jnp.dtype, decay: str = "matrix") -> nnx.Param:
  """A parameter with logical axis names and its weight-decay kind (optim.decay_mask reads it:
  "matrix" decays, "embedding" only with optim.decay_embeddings, "none" never: norm scales
  and biases); std=None means ones (norm scales), 0.0 zeros."""
  if std is None:
    value = jnp.ones(shape, dtype)
  elif std == 0.0 or rngs is None:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, decay=decay)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32, scale applied after casting back (as HF does)."""

  def __init__(self, dim: int, eps: float, name: str | None, dtype: jnp.dtype):
    self.eps = eps
    self.scale = _param(None, (dim,), (name,), None, dtype, decay="none")

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + swiglu(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    e, h, k, d, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dh, cfg.d_ff
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.attn_norm = RMSNorm(e, cfg.norm_eps, "embed", pd)
    self.wq = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), std, pd)
    self.wk = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wv = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wo = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), out_std, pd)
    if cfg.qkv_bias:
      self.bq = _param(None, (h, d), ("heads", "head_dim"), 0.0, pd, decay="none")
      self.bk = _param(None, (k, d), ("kv_heads", "head_dim"), 0.0, pd, decay="none")
      self.bv = _param(None, (k, d), ("kv_heads", "head_dim"), 0.0, pd, decay="none")
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.norm_eps, "head_dim", pd)
      self.k_norm = RMSNorm(d, cfg.norm_eps, "head_dim", pd)
    self.mlp_norm = RMSNorm(e, cfg.norm_eps, "embed", pd)
    self.w_gate = _param(rngs, (e, f), ("embed", "mlp"), std, pd)
    self.w_up = _param(rngs, (e, f), ("embed", "mlp"), std, pd)
    self.w_down = _param(rngs, (f, e), ("mlp", "embed"), out_std, pd)

  def __call__(self, x_bte: jax.Array, rope_cs: tuple[jax.Array, jax.Array],
               segment_ids_bt: jax.Array, context_layout: str = "contiguous"
               ) -> jax.Array:
    cfg, cd = self.cfg, x_bte.dtype
    h_bte = self.attn_norm(x_bte)
    q = jnp.einsum("bte,ehd->bthd", h_bte, self.wq[...].astype(cd))
    k = jnp.einsum("bte,ehd->bthd", h_bte, self.wk[...].astype(cd))
    v = jnp.einsum("bte,ehd->bthd", h_bte, self.wv[...].astype(cd))
    if cfg.qkv_bias:
      q, k, v = (q + self.bq[...].astype(cd), k + self.bk[...].astype(cd),
                 v + self.bv[...].astype(cd))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = sharding.constrain(apply_rope(q, rope_cs),
                           ("batch", "length", "heads", None))
    k = sharding.constrain(apply_rope(k, rope_cs),
                           ("batch", "length", "kv_heads", None))
    q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
    # 'auto' is chosen by build.setup for the mesh; a model built elsewhere (hf.load, passkey)
    # chooses for the devices it runs on
    impl = cfg.attention if cfg.attention != "auto" else attention_lib.choose(
        cfg, jax.devices()[0], sharding.context_size())
    o_bthd = attention_lib.attention(q, k, v, segment_ids_bt, implementation=impl,
                                     window=cfg.sliding_window, layout=context_layout,
                                     max_docs=cfg.cudnn_max_docs)
    o_bthd = checkpoint_name(o_bthd, "attn")
    attn_bte = jnp.einsum("bthd,hde->bte", o_bthd, self.wo[...].astype(cd))
    x_bte = x_bte + checkpoint_name(attn_bte, "attn_out")
    x_bte = sharding.constrain(x_bte, ("batch", "length", None))

    h_bte = self.mlp_norm(x_bte)
    gate_btf = jnp.einsum("bte,ef->btf", h_bte, self.w_gate[...].astype(cd))
    up_btf = jnp.einsum("bte,ef->btf", h_bte, self.w_up[...].astype(cd))
    act_btf = sharding.constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "mlp"))
    act_btf = checkpoint_name(act_btf, "mlp_hidden")
    mlp_bte = jnp.einsum("btf,fe->bte", act_btf, self.w_down[...].astype(cd))
    x_bte = x_bte + checkpoint_name(mlp_bte, "mlp_out")
    return sharding.constrain(x_bte, ("batch", "length", None))


class Decoder(nnx.Module):
  """Token ids [B, T] -> float32 logits [B, T, vocab]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd,
                        decay="embedding")

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r: nnx.Rngs) -> Block:
      return Block(cfg, r)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, "embed", pd)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                            cfg.init_std, pd, decay="embedding")

  def __call__(self, inputs_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None,
               context_layout: str = "contiguous") -> jax.Array:
    """context_layout: the token order of the rows when the mesh splits them over `context`:
    'contiguous' is the row's own order; 'zigzag' means the caller permuted them so
    (jmid.ring.permutation), and ring attention must know where each device's chunks sit."""
    x_bte, head_ev = self.hidden(inputs_bt, positions_bt, segment_ids_bt, context_layout)
    return sharding.constrain(loss_lib.logits(x_bte, head_ev), ("batch", "length", "vocab"))

  def hidden(self, inputs_bt: jax.Array, positions_bt: jax.Array | None = None,
             segment_ids_bt: jax.Array | None = None,
             context_layout: str = "contiguous") -> tuple[jax.Array, jax.Array]:
    """(final-normed hidden states [B, T, E] in the compute dtype, LM head [E, vocab]): what
    the logits are made of, for a loss that computes them in chunks (jmid.loss)."""
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
    x_bte = sharding.constrain(x_bte, ("batch", "length", None))
    cos, sin = cos_sin(positions_bt, cfg)  # once, for every layer
    rope_cs = (sharding.constrain(cos, ("batch", "length", None)),
               sharding.constrain(sin, ("batch", "length", None)))

    graphdef, stacked = nnx.split(self.blocks)

    def body(x: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
      return nnx.merge(graphdef, layer_state)(x, rope_cs, segment_ids_bt,
                                              context_layout), None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=remat_policy(cfg.remat), prevent_cse=False)
    x_bte, _ = jax.lax.scan(body, x_bte, stacked, unroll=1 if cfg.scan_layers else True)

    x_bte = self.final_norm(x_bte)
    return x_bte, self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]


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
  """Each parameter's weight-decay kind (see _param) as a pure dict matching the params."""
  return _metadata(cfg, "decay")


def init_params(cfg: ModelConfig, seed: int) -> dict:
  """Random params as a pure dict (call under jit with out_shardings to create them sharded)."""
  return nnx.to_pure_dict(nnx.state(Decoder(cfg, nnx.Rngs(seed))))


def apply(graphdef: nnx.GraphDef, params: dict, inputs_bt: jax.Array,
          positions_bt: jax.Array | None = None,
          segment_ids_bt: jax.Array | None = None,
          context_layout: str = "contiguous") -> jax.Array:
  """Pure forward pass over a params dict."""
  return nnx.merge(graphdef, params)(inputs_bt, positions_bt, segment_ids_bt, context_layout)


def hidden(graphdef: nnx.GraphDef, params: dict, inputs_bt: jax.Array,
           positions_bt: jax.Array, segment_ids_bt: jax.Array,
           context_layout: str = "contiguous") -> tuple[jax.Array, jax.Array]:
  """Pure Decoder.hidden over a params dict: (hidden states, LM head)."""
  return nnx.merge(graphdef, params).hidden(inputs_bt, positions_bt, segment_ids_bt,
                                            context_layout)


def count_params(params: dict) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
