"""Flash attention forward in Pallas: causal, packed documents, GQA, sliding window, softcap.

Step one of the kernel (issue 6): the forward pass, one program per (batch, query head, query
block), streaming key/value blocks with the online softmax in float32. Key blocks that the
causal mask or the window rule out are never visited (the loop bounds skip them), and a block
in which segment ids hide every key is skipped with lax.cond. GQA reads the shared kv head
(h // group) through the index map, so repeated K/V are never materialised. Semantics are those
of pallas_kernels.reference (bottom-right causal alignment for T != S; a query that sees no key
returns 0 and logsumexp -inf).

Not yet here: the Pallas backward (so no custom VJP yet: do not differentiate this function),
the TPU-tiled variant, per-platform dispatch and tuned block sizes. Until then jmid uses its
'xla' / 'cudnn' attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.reference import SegmentIds, split_segments

PAD_Q, PAD_KV = -2, -1  # segment ids of padding: they match nothing real, nor each other


def _kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale: float,
            causal: bool, window: int | None, softcap: float | None, bq: int, bk: int,
            n_kv: int, offset: int) -> None:
  """One query block against the key blocks it can see."""
  i = pl.program_id(2)
  q = q_ref[...].astype(jnp.float32) * scale  # [bq, D]
  q_seg = qs_ref[...]  # [bq]
  q_pos = i * bq + jnp.arange(bq) + offset  # in key coordinates
  d = q.shape[-1]

  def visit(j: jax.Array, carry: tuple) -> tuple:
    k_seg = ks_ref[pl.ds(j * bk, bk)]
    k_pos = j * bk + jnp.arange(bk)
    mask = q_seg[:, None] == k_seg[None, :]
    if causal:
      mask &= k_pos[None, :] <= q_pos[:, None]
    if window:
      mask &= q_pos[:, None] - k_pos[None, :] < window

    def compute(carry: tuple) -> tuple:
      m, l, acc = carry
      k = k_ref[pl.ds(j * bk, bk), :]
      v = v_ref[pl.ds(j * bk, bk), :]
      s = jax.lax.dot_general(q, k.astype(jnp.float32), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)  # [bq, bk]
      if softcap:
        s = softcap * jnp.tanh(s / softcap)
      s = jnp.where(mask, s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[:, None])
      alpha = jnp.exp(m - m_safe)
      pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
      return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry)

  lo, hi = 0, n_kv
  if causal:  # the last key any query of this block may see is (i + 1) * bq - 1 + offset
    hi = jnp.clip(pl.cdiv((i + 1) * bq + offset, bk), 0, n_kv)
  if window:  # the first is i * bq + offset - window + 1
    lo = jnp.clip((i * bq + offset - window + 1) // bk, 0, n_kv)
  init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, d), jnp.float32))
  m, l, acc = jax.lax.fori_loop(lo, hi, visit, init)
  seen = l > 0
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None],
                         0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _pad(x: jax.Array, axis: int, to: int, value: int | float = 0) -> jax.Array:
  extra = -x.shape[axis] % to
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "scale",
                                             "block_sizes", "interpret", "return_lse"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    segment_ids: SegmentIds = None, causal: bool = True,
                    window: int | None = None, softcap: float | None = None,
                    scale: float | None = None, block_sizes: tuple[int, int] | None = None,
                    interpret: bool | None = None,
                    return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """o [B, T, Hq, D] (and logsumexp [B, Hq, T] float32 with return_lse).

  q [B, T, Hq, D]; k, v [B, S, Hkv, D] with Hq a multiple of Hkv. block_sizes = (query block,
  key block), default (128, 128) capped at the padded lengths. interpret=None runs the kernel
  compiled on GPU/TPU and interpreted elsewhere (CPU).
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  scale = d ** -0.5 if scale is None else scale
  bq, bk = block_sizes or (128, 128)
  bq, bk = min(bq, -(-t // 8) * 8), min(bk, -(-s // 8) * 8)
  q_seg, kv_seg = split_segments(segment_ids, b, t, s)
  qp, q_seg = _pad(q, 1, bq), _pad(q_seg, 1, bq, PAD_Q)
  kp, vp, kv_seg = _pad(k, 1, bk), _pad(v, 1, bk), _pad(kv_seg, 1, bk, PAD_KV)
  tp, sp = qp.shape[1], kp.shape[1]
  group = hq // hkv
  kernel = functools.partial(_kernel, scale=scale, causal=causal, window=window,
                             softcap=softcap, bq=bq, bk=bk, n_kv=sp // bk, offset=s - t)
  sq = pl.squeezed
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, hq, tp // bq),
      in_specs=[
          pl.BlockSpec((sq, bq, sq, d), lambda bi, h, i: (bi, i, h, 0)),
          pl.BlockSpec((sq, sp, sq, d), lambda bi, h, i: (bi, 0, h // group, 0)),
          pl.BlockSpec((sq, sp, sq, d), lambda bi, h, i: (bi, 0, h // group, 0)),
          pl.BlockSpec((sq, bq), lambda bi, h, i: (bi, i)),
          pl.BlockSpec((sq, sp), lambda bi, h, i: (bi, 0)),
      ],
      out_specs=[
          pl.BlockSpec((sq, bq, sq, d), lambda bi, h, i: (bi, i, h, 0)),
          pl.BlockSpec((sq, sq, bq), lambda bi, h, i: (bi, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, tp, hq, d), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
      interpret=interpret,
      name="jmid_flash_attention_fwd",
  )(qp, kp, vp, q_seg, kv_seg)
  o, lse = o[:, :t], lse[:, :, :t]
  return (o, lse) if return_lse else o
