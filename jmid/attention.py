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
import numpy as np
from jax.sharding import PartitionSpec as P

from jmid import ring, sharding
from jmid.config import ATTENTION, ModelConfig, choose_attention


def platform_key(device: jax.Device) -> str:
  """The key of config.AUTO_ATTENTION for a device: its platform, with GPUs before Hopper
  apart (a device that does not say, as compile-only ones, counts as Hopper)."""
  major = str(getattr(device, "compute_capability", "9.0")).split(".")[0]
  return "gpu-sm8x" if device.platform == "gpu" and int(major) < 9 else device.platform


def choose(m: ModelConfig, device: jax.Device, context: int = 1) -> str:
  """model.attention, or what 'auto' picks for this device (our Triton kernel passed over on
  GPUs once jax makes its deprecation an error)."""
  if m.attention != "auto":
    return m.attention
  key = platform_key(device)
  from pallas_kernels import flash_gpu
  unusable = ("pallas",) if key.startswith("gpu") and not flash_gpu.triton_usable() else ()
  return choose_attention(m, key, context, unusable)


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
         scale: float, softcap: float = 0.0) -> jax.Array:
  b, t, hq, d = q_bthd.shape
  hkv = k_bshd.shape[2]
  q_btkgd = q_bthd.reshape(b, t, hkv, hq // hkv, d)  # GQA without repeating K/V
  logits_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bshd,
                            preferred_element_type=jnp.float32) * scale
  if softcap:
    logits_bkgts = softcap * jnp.tanh(logits_bkgts / softcap)
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
            causal: bool, window: int, scale: float, softcap: float) -> jax.Array:
  """Our kernel (Triton on GPU, Mosaic on TPU, interpreted on CPU), per device under a mesh:
  XLA cannot partition a Pallas call (it would gather every operand to every device)."""
  from pallas_kernels import flash_attention
  call = lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s, causal=causal,  # noqa: E731
                                            window=window or None, scale=scale,
                                            softcap=softcap or None)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return call(q_bthd, k_bshd, v_bshd, segment_ids_bt)
  return _per_device(call, q_bthd, k_bshd, v_bshd, segment_ids_bt, mesh, None)


def packed_offsets(segment_ids_bt: jax.Array, max_docs: int
                   ) -> tuple[jax.Array, jax.Array]:
  """cuDNN's packed layout of rows of documents: (lengths [B, max_docs], starts
  [B, max_docs + 1]) of each row's documents in order, -1 in unused slots. A document is a run
  of one nonzero segment id; padding (segment 0) is in none, and a row's documents past
  max_docs in none either (check_docs_per_row refuses such batches before they get here)."""
  b, t = segment_ids_bt.shape
  prev = jnp.pad(segment_ids_bt[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts_bt = segment_ids_bt != prev
  run_bt = jnp.cumsum(starts_bt, axis=1) - 1  # which run of the row each token is in
  run_len = jax.vmap(lambda r: jnp.zeros(t, jnp.int32).at[r].add(1))(run_bt)
  doc_starts = starts_bt & (segment_ids_bt != 0)
  pos = jax.vmap(lambda s: jnp.nonzero(s, size=max_docs, fill_value=-1)[0])(doc_starts)
  run_of_doc = jnp.take_along_axis(run_bt, jnp.maximum(pos, 0), axis=1)
  lengths = jnp.where(pos >= 0, jnp.take_along_axis(run_len, run_of_doc, axis=1), -1)
  starts = jnp.concatenate([pos, jnp.full((b, 1), -1, pos.dtype)], axis=1)
  return lengths.astype(jnp.int32), starts.astype(jnp.int32)


def docs_per_row(segment_ids: np.ndarray) -> int:
  """The most documents (runs of one nonzero segment id) any row of a host batch holds."""
  prev = np.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return int(((segment_ids != prev) & (segment_ids != 0)).sum(axis=1).max(initial=0))


def _cudnn(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, segment_ids_bt: jax.Array,
           causal: bool, window: int, scale: float, max_docs: int) -> jax.Array:
  """cuDNN's fused flash attention with packed documents given as offsets and lengths (Hopper):
  it skips other documents' tiles, and no [T, T] mask or bias exists. Per device under a mesh,
  as our kernel; outputs at padding (in no document) are zeroed."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # the offsets are not public

  def call(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
    lengths, starts = packed_offsets(seg, max_docs)
    mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    out = fa.dot_product_attention(q, k, v, None, None, lengths, lengths, starts, starts,
                                   scale=scale, mask_type=mask,
                                   sliding_window_length=window or None)
    return jnp.where((seg == 0)[:, :, None, None], jnp.zeros((), out.dtype), out)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return call(q_bthd, k_bshd, v_bshd, segment_ids_bt)
  return _per_device(call, q_bthd, k_bshd, v_bshd, segment_ids_bt, mesh, None)


def _ring(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, segment_ids_bt: jax.Array,
          implementation: str, causal: bool, window: int, scale: float, softcap: float,
          layout: str, mesh: jax.sharding.AbstractMesh) -> jax.Array:
  """Ring attention (jmid.ring) over the `context` axis; the rows arrive in `layout`'s token
  order (steps.in_context_layout puts them so)."""
  (axis,) = sharding.RULES["length"]
  call = functools.partial(ring.ring_attention, axis=axis, n=dict(mesh.shape)[axis],
                           layout=layout, causal=causal, window=window, scale=scale,
                           softcap=softcap, implementation=implementation)
  return _per_device(call, q_bthd, k_bshd, v_bshd, segment_ids_bt, mesh, "length")


def attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
              segment_ids_bt: jax.Array, *, implementation: str = "xla",
              causal: bool = True, window: int = 0, layout: str = "contiguous",
              max_docs: int = 32, scale: float | None = None, softcap: float = 0.0
              ) -> jax.Array:
  """Multi-head / grouped-query attention over packed rows; returns [B, T, Hq, D]. Under a
  mesh whose `context` axis is above 1 it is ring attention, rows in `layout`'s order.
  scale: of the logits (None: head width ** -0.5); softcap c > 0: logits -> c tanh(logits / c)
  after the scale (Gemma 2; cuDNN has no softcap: config.attention_problem refuses it)."""
  scale = q_bthd.shape[-1] ** -0.5 if scale is None else scale
  if sharding.context_size() > 1:
    return _ring(q_bthd, k_bshd, v_bshd, segment_ids_bt, implementation, causal, window, scale,
                 softcap, layout, jax.sharding.get_abstract_mesh())
  if implementation == "pallas":  # masks block by block from the segment ids: no [T, T] mask
    return _pallas(q_bthd, k_bshd, v_bshd, segment_ids_bt, causal, window, scale, softcap)
  if implementation == "cudnn":  # documents as offsets: no [T, T] mask either
    assert not softcap, "cuDNN's flash attention has no softcap"
    return _cudnn(q_bthd, k_bshd, v_bshd, segment_ids_bt, causal, window, scale, max_docs)
  if implementation == "xla":
    return _xla(q_bthd, k_bshd, v_bshd, segment_mask(segment_ids_bt, causal, window), scale,
                softcap)
  raise ValueError(f"unknown attention implementation {implementation!r}; "
                   f"choose one of {ATTENTION}")
