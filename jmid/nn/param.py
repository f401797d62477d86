"""How every weight is made: logical axis names (sharding.py maps them onto the mesh) and a
weight-decay kind (optim.decay_mask reads it), both as nnx metadata set at creation."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Sequence[str | None],
          std: float | None, dtype: jnp.dtype, decay: str = "matrix") -> nnx.Param:
  """A parameter with logical axis names and its weight-decay kind: "matrix" decays,
  "embedding" only with optim.decay_embeddings, "none" never (norm scales and biases);
  std=None means ones (norm scales), 0.0 zeros."""
  if std is None:
    value = jnp.ones(shape, dtype)
  elif std == 0.0 or rngs is None:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, decay=decay)
