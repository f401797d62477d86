"""Pure steps: train_step(state, batch) -> (state, metrics) and eval_step(params, batch).

State is a plain dict {step, params, opt_state[, ema]} so Orbax and sharding rules see ordinary
pytrees. Losses are token SUMS until the very end, so gradient accumulation over microbatches
gives exactly the gradient of the per-token mean over the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jmid import loss as loss_lib
from jmid import model as model_lib
from jmid import ring, sharding

State = dict[str, Any]
Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")  # int32 [B, T] each


def abstract_batch(rows: int, seq_len: int, sharding: Any = None) -> Batch:
  """The batch a step is compiled for, without allocating it."""
  return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=sharding)
          for k in BATCH_KEYS}


def init_state(params: dict, tx: optax.GradientTransformation, ema: bool = False) -> State:
  """Step 0 with a fresh optimizer; with `ema`, an EMA of the params that starts at them."""
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  if ema:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return state


def context_permutation(layout: str, t: int) -> np.ndarray | None:
  """The token order of rows of length t that ring attention wants under the current mesh
  (jmid.ring.permutation), or None when the rows stay as they are."""
  n = sharding.context_size()
  return None if n == 1 or layout == "contiguous" else ring.permutation(layout, n, t)


def in_context_layout(batch: Batch, layout: str) -> tuple[Batch, str]:
  """The batch's rows in the token order ring attention wants under the current mesh, and the
  layout to tell the model. Every key moves alike, so the loss sums are those of the row."""
  perm = context_permutation(layout, batch["inputs"].shape[-1])
  if perm is None:
    return batch, "contiguous"
  return {k: sharding.constrain(jnp.take(v, jnp.asarray(perm), axis=-1), ("batch", "length"))
          for k, v in batch.items()}, layout


def loss_sums(graphdef: nnx.GraphDef, params: dict, batch: Batch, z_loss: float = 0.0,
              context_layout: str = "contiguous", loss_chunks: int = 0
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(objective summed over target tokens, {ce_sum, z_sum, count}); all in float32.
  loss_chunks > 0: the LM head and loss in that many chunks of positions (jmid.loss)."""
  batch, layout = in_context_layout(batch, context_layout)
  x_bte, head_ev, cap = model_lib.hidden(graphdef, params, batch["inputs"],
                                         batch["positions"], batch["segment_ids"], layout)
  mask_bt = batch["loss_mask"].astype(jnp.float32)
  if loss_chunks:
    ce_sum, z_sum = loss_lib.chunked(x_bte, head_ev, batch["targets"], mask_bt,
                                     loss_chunks, cap)
  else:
    ce_sum, z_sum = loss_lib.plain(x_bte, head_ev, batch["targets"], mask_bt, cap)
  objective = ce_sum + z_loss * z_sum
  return objective, {"ce_sum": ce_sum, "z_sum": z_sum, "count": jnp.sum(mask_bt)}


def _microbatches(batch: Batch, n: int) -> Batch:
  """[B, T] -> [n, B/n, T], taking every n-th row so each microbatch spans all devices."""
  def split(x: jax.Array) -> jax.Array:
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch", "length"))
  return jax.tree.map(split, batch)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_fn: optax.Schedule, microbatches: int = 1,
                    z_loss: float = 0.0, ema_decay: float = 0.0,
                    context_layout: str = "contiguous", loss_chunks: int = 0
                    ) -> Callable[[State, Batch], tuple[State, dict]]:
  """Builds the pure step; train.py jits it once with explicit shardings and donation.

  ema_decay > 0: state["ema"] <- decay * ema + (1 - decay) * new params, after every update.
  A step whose loss, gradients or update are not all finite changes nothing but the step
  counter (params, optimizer state and EMA stay as they were) and reports `skipped` = 1: one
  bad batch costs a step, never the run, and no non-finite value ever enters the state.
  """
  grad_fn = jax.grad(lambda p, b: loss_sums(graphdef, p, b, z_loss, context_layout,
                                            loss_chunks), has_aux=True)

  def train_step(state: State, batch: Batch) -> tuple[State, dict]:
    params = state["params"]
    if microbatches == 1:
      grads, sums = grad_fn(params, batch)
    else:
      def accumulate(carry: tuple, mb: Batch) -> tuple[tuple, None]:
        g_acc, s_acc = carry
        g, s = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None
      zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      zeros_s = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "z_sum", "count")}
      (grads, sums), _ = jax.lax.scan(accumulate, (zeros_g, zeros_s),
                                      _microbatches(batch, microbatches))
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"params": new_params, "opt_state": opt_state}
    if ema_decay:
      new_state["ema"] = optax.incremental_update(new_params, state["ema"], 1.0 - ema_decay)
    grad_norm = optax.tree.norm(grads)
    finite = (jnp.isfinite(sums["ce_sum"]) & jnp.isfinite(sums["z_sum"])
              & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates)))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             {k: state[k] for k in new_state})
    new_state["step"] = state["step"] + 1
    metrics = {
        "loss": sums["ce_sum"] / count,
        "z_loss": sums["z_sum"] / count,
        "skipped": 1.0 - finite.astype(jnp.float32),
        "grad_norm": grad_norm,
        "lr": lr_fn(state["step"]),
        "target_tokens": sums["count"],
    }
    return new_state, metrics

  return train_step


def all_finite(tree: Any) -> jax.Array:
  """True when every float in `tree` is finite (one reduction per array, on device): checked
  before every save, so a checkpoint never holds a NaN or an inf."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_eval_step(graphdef: nnx.GraphDef, context_layout: str = "contiguous",
                   loss_chunks: int = 0) -> Callable[[dict, Batch], dict[str, jax.Array]]:
  """(params, batch) -> {ce_sum, count}: the caller averages over batches per target token."""
  def eval_step(params: dict, batch: Batch) -> dict[str, jax.Array]:
    _, sums = loss_sums(graphdef, params, batch, context_layout=context_layout,
                        loss_chunks=loss_chunks)
    return {"ce_sum": sums["ce_sum"], "count": sums["count"]}
  return eval_step
