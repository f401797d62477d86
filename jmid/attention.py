"""One attention() for every implementation, so the model never branches on the backend.

Packed documents: a query attends to a key only when both carry the same segment id and the key
is not later in the row. Padding (segment 0) attends only to padding, so no row is fully masked
and no NaN appears; its loss is masked elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmid import ring, sharding
from jmid.config import ATTENTION


def segment_mask(segment_ids_bt: jax.Array, causal: bool = True, window: int = 0) -> jax.Array:
  """[B, 1, T, T] bool: same document, (when causal) key index <= query index, and (when
  window > 0) fewer than `window` tokens back, as Mistral's sliding window counts them."""
  t = segment_ids_bt.shape[1]
  mask = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  if causal:
    mask = mask & jnp.tril(jnp.ones((t, t), dtype=bool))[None]
  if window:
    idx = jnp.arange(t)
    mask = mask & ((idx[:, None] - idx[None, :]) < window)[None]
  return mask[:, None]


def _xla(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, mask_b1ts: jax.Array,
         scale: float) -> jax.Array:
  b, t, hq, d = q_bthd.shape
  hkv = k_bshd.shape[2]
  q_btkgd = q_bthd.reshape(b, t, hkv, hq // hkv, d)  # GQA without repeating K/V
  logits_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bshd,
                            preferred_element_type=jnp.float32) * scale
  logits_bkgts = jnp.where(mask_b1ts[:, :, None], logits_bkgts, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bshd.dtype)
  o_btkgd = jnp.einsum("bkgts,bskd->btkgd", probs, v_bshd)
  return o_btkgd.reshape(b, t, hq, d)


def _per_device(call: Callable[..., jax.Array], q_bthd: jax.Array, k_bshd: jax.Array,
                v_bshd: jax.Array, segment_ids_bt: jax.Array, mesh: jax.sharding.AbstractMesh,
                length: str | None) -> jax.Array:
  """call(q, k, v, segment_ids) on each device's slice in shard_map: rows split as the batch
  is, heads as the tensor axis splits them (both or neither of q and kv heads, to keep the GQA
  groups whole), the sequence whole (length=None) or over its `length` axes (ring attention)."""
  sizes = dict(mesh.shape)
  q_spec = sharding.logical_spec(("batch", length, "heads", None), q_bthd.shape, sizes)
  kv_spec = sharding.logical_spec(("batch", length, "kv_heads", None), k_bshd.shape, sizes)
  if q_spec[2] != kv_spec[2]:
    q_spec, kv_spec = P(*q_spec[:2], None, None), P(*kv_spec[:2], None, None)
  return jax.shard_map(call, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(*q_spec[:2])),
                       out_specs=q_spec, check_vma=False)(q_bthd, k_bshd, v_bshd, segment_ids_bt)


def _pallas(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, segment_ids_bt: jax.Array,
            causal: bool, window: int, scale: float) -> jax.Array:
  """Our kernel (Triton on GPU, Mosaic on TPU, interpreted on CPU), per device under a mesh:
  XLA cannot partition a Pallas call (it would gather every operand to every device)."""
  from pallas_kernels import flash_attention
  call = lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s, causal=causal,  # noqa: E731
                                            window=window or None, scale=scale)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return call(q_bthd, k_bshd, v_bshd, segment_ids_bt)
  return _per_device(call, q_bthd, k_bshd, v_bshd, segment_ids_bt, mesh, None)


def _ring(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, segment_ids_bt: jax.Array,
          implementation: str, causal: bool, window: int, scale: float, layout: str,
          mesh: jax.sharding.AbstractMesh) -> jax.Array:
  """Ring attention (jmid.ring) over the `context` axis; the rows arrive in `layout`'s token
  order (steps.in_context_layout puts them so)."""
  (axis,) = sharding.RULES["length"]
  call = functools.partial(ring.ring_attention, axis=axis, n=dict(mesh.shape)[axis],
                           layout=layout, causal=causal, window=window, scale=scale,
                           implementation=implementation)
  return _per_device(call, q_bthd, k_bshd, v_bshd, segment_ids_bt, mesh, "length")


def attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
              segment_ids_bt: jax.Array, *, implementation: str = "xla",
              causal: bool = True, window: int = 0, layout: str = "contiguous"
              ) -> jax.Array:
  """Multi-head / grouped-query attention over packed rows; returns [B, T, Hq, D]. Under a
  mesh whose `context` axis is above 1 it is ring attention, rows in `layout`'s order."""
  scale = q_bthd.shape[-1] ** -0.5
  if sharding.context_size() > 1:
    return _ring(q_bthd, k_bshd, v_bshd, segment_ids_bt, implementation, causal, window, scale,
                 layout, jax.sharding.get_abstract_mesh())
  if implementation == "pallas":  # masks block by block from the segment ids: no [T, T] mask
    return _pallas(q_bthd, k_bshd, v_bshd, segment_ids_bt, causal, window, scale)
  mask = segment_mask(segment_ids_bt, causal, window)
  if implementation == "xla":
    return _xla(q_bthd, k_bshd, v_bshd, mask, scale)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, mask=mask, scale=scale,
                                        is_causal=causal, implementation="cudnn")
  raise ValueError(f"unknown attention implementation {implementation!r}; "
                   f"choose one of {ATTENTION}")
