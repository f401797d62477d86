"""Rotary position embeddings in the half-split layout Hugging Face uses (`rotate_half`).

With this layout HF q/k projection weights load unchanged. Angles are computed from explicit
per-token positions (which restart at 0 in each packed document), always in float32.

Context extension changes only these frequencies, never a parameter: a larger `rope_theta`
(ABF), or a scaling as Hugging Face defines it (`rope_scaling`: linear position interpolation,
Llama 3.1's band-wise `llama3`, or `yarn`, which also scales cos/sin by an attention factor).
tests/test_rope.py checks each against transformers' own functions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jmid.config import ModelConfig


def inv_frequencies(head_dim: int, theta: float) -> jax.Array:
  """theta^(-2i/d) for i in [0, d/2): the per-pair rotation speeds."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def scaled_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """(inverse frequencies [head_dim/2] float32, cos/sin scale) for the configured scaling.

  Computed in numpy at trace time: constants of the compiled step, like HF's buffers.
  """
  d, base, factor = cfg.dh, cfg.rope_theta, cfg.rope_factor
  inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float32) / d))
  kind = cfg.rope_scaling
  if kind == "none":
    return inv, 1.0
  if kind == "linear":
    return inv / factor, 1.0
  if kind == "llama3":
    old = cfg.rope_original_max_len
    low_wavelen = old / cfg.rope_low_freq_factor
    high_wavelen = old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out).astype(np.float32), 1.0
  # yarn: interpolate the slow (long-wavelength) pairs, keep the fast ones, ramp in between
  attention = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

  def correction_dim(rotations: float) -> float:
    return (d * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi))) / (
        2 * math.log(base))
  low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), d - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1 - ramp  # 1 = extrapolate (unchanged), 0 = interpolate (divided by factor)
  out = (inv / factor) * (1 - keep) + inv * keep
  return out.astype(np.float32), float(attention)


def cos_sin(positions_bt: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, head_dim/2] (float32, scaled as yarn asks) of every token's angles:
  computed once per forward pass and shared by every layer's q and k."""
  inv, scale = scaled_frequencies(cfg)
  angles_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv)
  return jnp.cos(angles_btf) * scale, jnp.sin(angles_btf) * scale


def apply_rope(x_bthd: jax.Array, cs: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates the first and second halves of each head as pairs (x1, x2) by the angles whose
  (cos, sin) `cs` holds (cos_sin)."""
  d = x_bthd.shape[-1]
  cos, sin = (a[:, :, None, :] for a in cs)
  assert cos.shape[-1] == d // 2, (cos.shape, d)
  x = x_bthd.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthd.dtype)
