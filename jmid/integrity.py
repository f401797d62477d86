"""Fingerprints of a train state, so a checkpoint that reads back wrong is caught on restore.

Orbax's OCDBT files checksum their b-tree nodes but not the array chunks: bytes zeroed inside
a chunk can decode without an error (zstd keeps no checksum) and a resumed run goes NaN much
later. `checkpoint.save` records `fingerprints(state)` in the step's meta and every restore
recomputes them on what it read.

A fingerprint is two wrapping uint32 sums over an array's bits, taken as 32-bit words: sum(w)
and sum(w * m(i)), m(i) an odd hash of the word's global index i. The first changes with any
single changed word, the second with any zeroed, moved or swapped run of words. Integer sums
are exact, so the value depends only on the array's values, never on its sharding or mesh, and
it is computed on the devices (one jit for the whole tree, one small transfer back).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def path_str(path: tuple) -> str:
  """A jax key path as Orbax names the array: keys and indices joined by dots."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def _words(x: jax.Array) -> jax.Array:
  """x's bits as uint32 words: 8/16-bit values widened, 64-bit ones split in two."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size not in _UINT or jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"fingerprints: no fingerprint for dtype {x.dtype}")
  return lax.bitcast_convert_type(x, _UINT[size]).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: neighbouring indices get unrelated multipliers."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _sums(x: jax.Array) -> jax.Array:
  """[sum(w), sum(w * odd(index))] of one array, uint32 with wraparound."""
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):  # the row-major index, mod 2**32 (any array size)
    index = index + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
    stride = stride * w.shape[axis] % 2**32
  multiplier = _mix(index + jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * multiplier, dtype=jnp.uint32)])


@jax.jit
def _all_sums(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_sums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprints(tree: Any) -> dict[str, list[int]]:
  """{'params.embed': [sum, weighted sum], ...} for every array leaf of `tree`.

  Every process of a multi-host run must call it (it is one jitted computation over the
  global arrays); the result is replicated, so each reads its own copy."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = _all_sums([x for _, x in flat])
  if isinstance(out, jax.Array) and not out.is_fully_addressable:
    out = out.addressable_data(0)  # replicated: this process's copy is the whole value
  sums = np.asarray(out)
  return {path_str(p): [int(a), int(b)] for (p, _), (a, b) in zip(flat, sums)}


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
  """The keys present in both whose fingerprints differ (the caller knows what it read)."""
  return [k for k in expected if k in actual and list(expected[k]) != list(actual[k])]
