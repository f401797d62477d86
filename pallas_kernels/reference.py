"""Pure-jnp attention with the exact semantics of pallas_kernels.flash_attention.

It is the tests' reference and the fallback where no kernel applies. Conventions:
- q [B, T, Hq, D]; k, v [B, S, Hkv, D]; Hq a multiple of Hkv (query head h reads kv head
  h // (Hq // Hkv)).
- causal with T != S aligns the ends (bottom-right, as FlashAttention and cuDNN do): query i
  sits at key position i + S - T.
- segment_ids: one [B, T] array (T == S) or a (q [B, T], kv [B, S]) pair; a query sees only
  keys of its own segment.
- window w: a query sees keys fewer than w positions back.
- softcap c: logits -> c * tanh(logits / c) (Gemma 2), after the scale.
- A query that sees no key returns 0 and logsumexp -inf, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SegmentIds = jax.Array | tuple[jax.Array, jax.Array] | None


def split_segments(segment_ids: SegmentIds, b: int, t: int,
                   s: int) -> tuple[jax.Array, jax.Array]:
  """(q segments [B, T], kv segments [B, S]) int32; all zeros when there are none."""
  if segment_ids is None:
    return jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
  if isinstance(segment_ids, tuple):
    q_seg, kv_seg = segment_ids
  else:
    if t != s:
      raise ValueError(f"one segment_ids array needs T == S (got {t} and {s}); pass a "
                       "(q_segment_ids, kv_segment_ids) pair")
    q_seg = kv_seg = segment_ids
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def visible(q_seg_bt: jax.Array, kv_seg_bs: jax.Array, causal: bool,
            window: int | None, offset: int | None = None) -> jax.Array:
  """[B, T, S] bool: which keys each query may attend to; query i sits at key position
  i + offset (default S - T: the ends aligned)."""
  t, s = q_seg_bt.shape[1], kv_seg_bs.shape[1]
  q_pos = jnp.arange(t)[:, None] + (s - t if offset is None else offset)
  k_pos = jnp.arange(s)[None, :]
  mask = q_seg_bt[:, :, None] == kv_seg_bs[:, None, :]
  if causal:
    mask = mask & (k_pos <= q_pos)[None]
  if window:
    mask = mask & (q_pos - k_pos < window)[None]
  return mask


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        segment_ids: SegmentIds = None, causal: bool = True,
                        window: int | None = None, softcap: float | None = None,
                        scale: float | None = None,
                        return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """o [B, T, Hq, D] in q's dtype (and logsumexp [B, Hq, T] float32 when asked)."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
  scale = d ** -0.5 if scale is None else scale
  q_seg, kv_seg = split_segments(segment_ids, b, t, s)
  logits = _logits(q, k, scale, softcap)
  o, lse = _softmax(logits, visible(q_seg, kv_seg, causal, window)[:, None, None], v, q.dtype)
  return (o, lse) if return_lse else o


def _logits(q: jax.Array, k: jax.Array, scale: float, softcap: float | None) -> jax.Array:
  """[B, Hkv, G, T, S] float32 scaled (and softcapped) logits; GQA without repeating K."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  q5 = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
  logits = jnp.einsum("btkgd,bskd->bkgts", q5, k.astype(jnp.float32)) * scale
  return softcap * jnp.tanh(logits / softcap) if softcap else logits


def _softmax(logits: jax.Array, mask: jax.Array, v: jax.Array, dtype: jnp.dtype
             ) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, Hq, D] in dtype, logsumexp [B, Hq, T]) of masked logits; a query that sees
  no key gets 0 and -inf, never NaN."""
  b, hkv, g, t, _ = logits.shape
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m_safe)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(l > 0, l, 1.0), v.astype(jnp.float32))
  lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m_safe, -jnp.inf)[..., 0]
  return o.reshape(b, t, hkv * g, -1).astype(dtype), lse.reshape(b, hkv * g, t)


def _block_logits(cfg, q, k, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
  """(logits [B, Hkv, G, T, S] float32, visibility broadcastable to them) under `cfg`, whose
  offset places query i at key position i + cfg.offset (any integer)."""
  mask = visible(q_seg, kv_seg, cfg.causal, cfg.window, cfg.offset)
  return _logits(q, k, cfg.scale, cfg.softcap), mask[:, None, None]


def block_forward(cfg, q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
  """The kernels' forward interface (pallas_kernels.blocks.Cfg, q/kv segment ids) in jnp:
  (o [B, T, Hq, D], logsumexp [B, Hq, T] float32). Ring attention's 'xla' blocks."""
  logits, mask = _block_logits(cfg, q, k, q_seg, kv_seg)
  return _softmax(logits, mask, v, q.dtype)


def block_backward(cfg, q, k, v, q_seg, kv_seg, o, lse, do, dlse
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The kernels' backward interface in jnp: (dq, dk, dv) of one block pair, with `o` and
  `lse` those of the whole attention (the block's probabilities are exp(logits - lse))."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  logits, mask = _block_logits(cfg, q, k, q_seg, kv_seg)
  lse5 = lse.reshape(b, hkv, g, t)[..., None]
  p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(lse5), lse5, 0.0)), 0.0)
  do5 = do.reshape(b, t, hkv, g, d).astype(jnp.float32)
  delta = (jnp.einsum("btkgd,btkgd->bkgt", do5, o.reshape(b, t, hkv, g, d).astype(jnp.float32))
           - dlse.reshape(b, hkv, g, t))
  dv = jnp.einsum("bkgts,btkgd->bskd", p, do5)
  ds = p * (jnp.einsum("btkgd,bskd->bkgts", do5, v.astype(jnp.float32)) - delta[..., None])
  if cfg.softcap:  # s = c tanh(x / c): ds/dx = 1 - (s / c)^2
    ds = ds * (1.0 - jnp.square(logits / cfg.softcap))
  ds = ds * cfg.scale
  dq = jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(jnp.float32)).reshape(b, t, hq, d)
  dk = jnp.einsum("bkgts,btkgd->bskd", ds, q.reshape(b, t, hkv, g, d).astype(jnp.float32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
