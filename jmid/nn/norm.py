"""RMSNorm in the three ways the families compute it (config.NORM_STYLES): the mean square
always in float32; Llama casts back before the scale, Gemma and OLMo scale in float32 and cast
after; Gemma's scale is 1 + w with w stored (and zero-initialised) as its checkpoints hold it."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jmid.config import ModelConfig
from jmid.nn.param import param


class RMSNorm(nnx.Module):
  """Normalises over the trailing len(shape) axes (one: a width; two: all heads of a q or k
  projection, as OLMo 2 does) and scales by a weight of that shape."""

  def __init__(self, shape: Sequence[int], names: Sequence[str | None], eps: float,
               style: str, dtype: jnp.dtype):
    self.eps, self.style = eps, style
    self.scale = param(None, tuple(shape), tuple(names), 0.0 if style == "gemma" else None,
                       dtype, decay="none")

  def __call__(self, x: jax.Array) -> jax.Array:
    axes = tuple(range(-self.scale.ndim, 0))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + self.eps)
    w = self.scale[...]
    if self.style == "llama":
      return w.astype(x.dtype) * y.astype(x.dtype)
    w32 = w.astype(jnp.float32)
    return (y * (1.0 + w32 if self.style == "gemma" else w32)).astype(x.dtype)


def make(cfg: ModelConfig, width: int, name: str) -> RMSNorm:
  """A norm over one axis of `width` (logical name `name`) in the model's style."""
  return RMSNorm((width,), (name,), cfg.norm_eps, cfg.norm_style, jnp.dtype(cfg.param_dtype))
