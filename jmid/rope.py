"""Rotary position embeddings in the half-split layout Hugging Face uses (`rotate_half`).

With this layout HF q/k projection weights load unchanged. Angles are computed from explicit
per-token positions (which restart at 0 in each packed document), always in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, theta: float) -> jax.Array:
  """theta^(-2i/d) for i in [0, d/2): the per-pair rotation speeds."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotates the first and second halves of each head as pairs (x1, x2) by position angles."""
  d = x_bthd.shape[-1]
  angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_frequencies(d, theta)
  cos = jnp.cos(angles_btf)[:, :, None, :]
  sin = jnp.sin(angles_btf)[:, :, None, :]
  x = x_bthd.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthd.dtype)
