"""AdamW with a weight-decay mask, global-norm clipping, and learning-rate schedules.

WSD (warmup-stable-decay) is the mid-training default: the stable phase can be resumed or
extended, and the final decay to `end_lr` (often 0) is the anneal. optax has no WSD, so it is
joined from pieces here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jmid.config import OptimConfig

def _decay(shape: str, init: float, end: float, steps: int) -> optax.Schedule:
  """init -> end over `steps` with the given shape (linear, 1-sqrt or cosine)."""
  steps = max(steps, 1)
  if shape == "linear":
    return optax.linear_schedule(init, end, steps)
  if shape == "cosine":
    return optax.cosine_decay_schedule(init, steps, alpha=end / init if init else 0.0)

  def one_minus_sqrt(count: jax.Array) -> jax.Array:
    frac = jnp.clip(count / steps, 0.0, 1.0)
    return end + (init - end) * (1.0 - jnp.sqrt(frac))
  return one_minus_sqrt


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate at each optimizer step: warmup 0 -> lr, then the configured shape."""
  warm = cfg.warmup_steps
  warmup = optax.linear_schedule(0.0, cfg.lr, warm) if warm else optax.constant_schedule(cfg.lr)
  rest = max(total_steps - warm, 1)
  if cfg.schedule == "constant":
    body = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    body = _decay("cosine", cfg.lr, cfg.end_lr, rest)
  elif cfg.schedule == "linear":
    body = _decay("linear", cfg.lr, cfg.end_lr, rest)
  else:  # wsd
    decay = cfg.decay_steps or max(int(0.2 * total_steps), 1)
    stable = max(total_steps - warm - decay, 0)
    body = optax.join_schedules(
        [optax.constant_schedule(cfg.lr), _decay(cfg.decay_shape, cfg.lr, cfg.end_lr, decay)],
        [stable])
  if not warm:
    return body
  return optax.join_schedules([warmup, body], [warm])


def decay_mask(kinds: Any, decay_embeddings: bool) -> Any:
  """True where weight decay applies, from each parameter's kind as the model marked it where
  it made it (model.decay_kinds): matrices, embeddings only if asked, never norms or biases."""
  return jax.tree.map(lambda k: k == "matrix" or (k == "embedding" and decay_embeddings), kinds)


def make_optimizer(cfg: OptimConfig, total_steps: int, kinds: Any
                   ) -> optax.GradientTransformation:
  """clip -> AdamW(schedule, decay masked by the params' kinds). The lr is readable from the
  schedule by step."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(
      learning_rate=schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=decay_mask(kinds, cfg.decay_embeddings)))
  return optax.chain(*parts)
