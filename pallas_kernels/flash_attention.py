"""Flash attention in Pallas: causal, packed documents, GQA, sliding window, softcap; forward
and backward (a custom VJP whose three kernels are all Pallas).

Forward: one program per (batch, query head, query block) streams key/value blocks with the
online softmax in float32. Backward (FlashAttention-2): one program per (batch, query head, key
block) accumulates dk, dv over the query blocks that see it, and one per query block
accumulates dq, both recomputing p from the saved logsumexp. Blocks that causality or the
window rule out are never visited (loop bounds); a block in which segment ids hide every pair
is skipped with lax.cond. GQA reads the shared kv head (h // group) through the index map, so
K/V are never repeated; dk and dv are produced per query head and summed over each group.
Semantics are those of pallas_kernels.reference (bottom-right causal alignment for T != S; a
query that sees no key returns 0 and logsumexp -inf).

Not yet here (the kernel's issue goes on): the TPU-tiled variant and the Mosaic GPU layouts
(neither platform lowers this generic kernel yet: jax.export for "cuda" stops at an iota
whose Mosaic GPU layout must be cast, for "tpu" at the (8, 128) block rule), per-platform
dispatch, tuned block sizes. jmid's model.attention='pallas' runs it interpreted on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.reference import SegmentIds, split_segments

PAD_Q, PAD_KV = -2, -1  # segment ids of padding: they match nothing real, nor each other


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Everything static about one call (hashable: it keys the custom VJP)."""

  scale: float
  causal: bool
  window: int | None
  softcap: float | None
  bq: int
  bk: int
  offset: int  # S - T: query i sits at key position i + offset
  group: int  # query heads per kv head
  interpret: bool


def _mask(cfg: _Cfg, q_seg: jax.Array, k_seg: jax.Array, q_pos: jax.Array,
          k_pos: jax.Array) -> jax.Array:
  mask = q_seg[:, None] == k_seg[None, :]
  if cfg.causal:
    mask &= k_pos[None, :] <= q_pos[:, None]
  if cfg.window:
    mask &= q_pos[:, None] - k_pos[None, :] < cfg.window
  return mask


def _logits(cfg: _Cfg, q: jax.Array, k: jax.Array) -> jax.Array:
  """[bq, bk] float32 logits of a scaled query block against a key block, softcapped."""
  s = jax.lax.dot_general(q, k.astype(jnp.float32), (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
  return cfg.softcap * jnp.tanh(s / cfg.softcap) if cfg.softcap else s


def _mm(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


def _kv_range(cfg: _Cfg, i: jax.Array, n_kv: int) -> tuple[jax.Array | int, jax.Array | int]:
  """The key blocks query block i can see: [lo, hi)."""
  lo, hi = 0, n_kv
  if cfg.causal:  # its last query sits at key position (i + 1) * bq - 1 + offset
    hi = jnp.clip(pl.cdiv((i + 1) * cfg.bq + cfg.offset, cfg.bk), 0, n_kv)
  if cfg.window:  # its first query sees back to i * bq + offset - window + 1
    lo = jnp.clip((i * cfg.bq + cfg.offset - cfg.window + 1) // cfg.bk, 0, n_kv)
  return lo, hi


def _q_range(cfg: _Cfg, j: jax.Array, n_q: int) -> tuple[jax.Array | int, jax.Array | int]:
  """The query blocks that can see key block j: [lo, hi)."""
  lo, hi = 0, n_q
  if cfg.causal:  # a query sees key j * bk once its position i + offset reaches it
    lo = jnp.clip((j * cfg.bk - cfg.offset) // cfg.bq, 0, n_q)
  if cfg.window:  # and stops once i + offset - window + 1 passes the block's last key
    hi = jnp.clip(((j + 1) * cfg.bk - 2 + cfg.window - cfg.offset) // cfg.bq + 1, 0, n_q)
  return lo, hi


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, cfg: _Cfg,
                n_kv: int) -> None:
  """One query block against the key blocks it can see (online softmax)."""
  i = pl.program_id(2)
  q = q_ref[...].astype(jnp.float32) * cfg.scale  # [bq, D]
  q_seg, q_pos = qs_ref[...], i * cfg.bq + jnp.arange(cfg.bq) + cfg.offset

  def visit(j: jax.Array, carry: tuple) -> tuple:
    ks = pl.ds(j * cfg.bk, cfg.bk)
    mask = _mask(cfg, q_seg, ks_ref[ks], q_pos, j * cfg.bk + jnp.arange(cfg.bk))

    def compute(carry: tuple) -> tuple:
      m, l, acc = carry
      v = v_ref[ks, :]
      s = jnp.where(mask, _logits(cfg, q, k_ref[ks, :]), -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[:, None])
      alpha = jnp.exp(m - m_safe)
      return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + _mm(
          p.astype(v.dtype), v, (1, 0))

    return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry)

  init = (jnp.full((cfg.bq,), -jnp.inf, jnp.float32), jnp.zeros((cfg.bq,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(*_kv_range(cfg, i, n_kv), visit, init)
  seen = l > 0
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None],
                         0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _probs_and_dlogits(cfg: _Cfg, q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
                       lse: jax.Array, delta: jax.Array, mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """(p, d loss / d (q.k * scale)) for one block pair, recomputed from the logsumexp."""
  s = _logits(cfg, q, k)
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[:, None]), 0.0)
  ds = p * (_mm(do.astype(jnp.float32), v.astype(jnp.float32), (1, 1)) - delta[:, None])
  if cfg.softcap:  # s = c tanh(x / c): ds/dx = 1 - (s / c)^2
    ds = ds * (1.0 - jnp.square(s / cfg.softcap))
  return p, ds


def _dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: _Cfg, n_kv: int) -> None:
  i = pl.program_id(2)
  q = q_ref[...].astype(jnp.float32) * cfg.scale
  q_seg, q_pos = qs_ref[...], i * cfg.bq + jnp.arange(cfg.bq) + cfg.offset
  do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]

  def visit(j: jax.Array, dq: jax.Array) -> jax.Array:
    ks = pl.ds(j * cfg.bk, cfg.bk)
    mask = _mask(cfg, q_seg, ks_ref[ks], q_pos, j * cfg.bk + jnp.arange(cfg.bk))

    def compute(dq: jax.Array) -> jax.Array:
      k = k_ref[ks, :]
      _, ds = _probs_and_dlogits(cfg, q, k, v_ref[ks, :], do, lse, delta, mask)
      return dq + _mm(ds, k.astype(jnp.float32), (1, 0))

    return jax.lax.cond(jnp.any(mask), compute, lambda d: d, dq)

  dq = jax.lax.fori_loop(*_kv_range(cfg, i, n_kv), visit, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, cfg: _Cfg, n_q: int) -> None:
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_seg, k_pos = ks_ref[...], j * cfg.bk + jnp.arange(cfg.bk)

  def visit(i: jax.Array, carry: tuple) -> tuple:
    qs = pl.ds(i * cfg.bq, cfg.bq)
    mask = _mask(cfg, qs_ref[qs], k_seg, i * cfg.bq + jnp.arange(cfg.bq) + cfg.offset, k_pos)

    def compute(carry: tuple) -> tuple:
      dk, dv = carry
      q = q_ref[qs, :].astype(jnp.float32) * cfg.scale
      do = do_ref[qs, :]
      p, ds = _probs_and_dlogits(cfg, q, k, v, do, lse_ref[qs], delta_ref[qs], mask)
      return dk + _mm(ds, q, (0, 0)), dv + _mm(p, do.astype(jnp.float32), (0, 0))

    return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(*_q_range(cfg, j, n_q), visit, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)  # q was already scaled: dk = scale * ds^T q
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(cfg: _Cfg, tp: int, sp: int, d: int, by_kv: bool) -> dict[str, pl.BlockSpec]:
  """BlockSpecs over the grid (b, q head, block): blocked along queries, or along keys."""
  sq, g = pl.squeezed, cfg.group
  if by_kv:
    q_block = pl.BlockSpec((sq, tp, sq, d), lambda b, h, j: (b, 0, h, 0))
    kv_block = pl.BlockSpec((sq, cfg.bk, sq, d), lambda b, h, j: (b, j, h // g, 0))
    return dict(q=q_block, kv=kv_block, qs=pl.BlockSpec((sq, tp), lambda b, h, j: (b, 0)),
                ks=pl.BlockSpec((sq, cfg.bk), lambda b, h, j: (b, j)),
                row=pl.BlockSpec((sq, sq, tp), lambda b, h, j: (b, h, 0)),
                grad_kv=pl.BlockSpec((sq, cfg.bk, sq, d), lambda b, h, j: (b, j, h, 0)))
  return dict(q=pl.BlockSpec((sq, cfg.bq, sq, d), lambda b, h, i: (b, i, h, 0)),
              kv=pl.BlockSpec((sq, sp, sq, d), lambda b, h, i: (b, 0, h // g, 0)),
              qs=pl.BlockSpec((sq, cfg.bq), lambda b, h, i: (b, i)),
              ks=pl.BlockSpec((sq, sp), lambda b, h, i: (b, 0)),
              row=pl.BlockSpec((sq, sq, cfg.bq), lambda b, h, i: (b, h, i)))


def _forward(cfg: _Cfg, q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
  (b, tp, hq, d), sp = q.shape, k.shape[1]
  sp_ = _specs(cfg, tp, sp, d, by_kv=False)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, n_kv=sp // cfg.bk),
      grid=(b, hq, tp // cfg.bq),
      in_specs=[sp_["q"], sp_["kv"], sp_["kv"], sp_["qs"], sp_["ks"]],
      out_specs=[sp_["q"], sp_["row"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
      interpret=cfg.interpret, name="jmid_flash_attention_fwd",
  )(q, k, v, q_seg, kv_seg)


def _backward(cfg: _Cfg, q, k, v, q_seg, kv_seg, o, lse, do, dlse
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  (b, tp, hq, d), (sp, hkv) = q.shape, k.shape[1:3]
  # d lse_i / d s_ij = p_ij, so a cotangent on lse enters exactly like -delta
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
  by_q = _specs(cfg, tp, sp, d, by_kv=False)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, n_kv=sp // cfg.bk),
      grid=(b, hq, tp // cfg.bq),
      in_specs=[by_q["q"], by_q["kv"], by_q["kv"], by_q["qs"], by_q["ks"], by_q["q"],
                by_q["row"], by_q["row"]],
      out_specs=by_q["q"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=cfg.interpret, name="jmid_flash_attention_dq",
  )(q, k, v, q_seg, kv_seg, do, lse, delta)
  by_k = _specs(cfg, tp, sp, d, by_kv=True)
  per_head = jax.ShapeDtypeStruct((b, sp, hq, d), jnp.float32)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, n_q=tp // cfg.bq),
      grid=(b, hq, sp // cfg.bk),
      in_specs=[by_k["q"], by_k["kv"], by_k["kv"], by_k["qs"], by_k["ks"], by_k["q"],
                by_k["row"], by_k["row"]],
      out_specs=[by_k["grad_kv"], by_k["grad_kv"]], out_shape=[per_head, per_head],
      interpret=cfg.interpret, name="jmid_flash_attention_dkv",
  )(q, k, v, q_seg, kv_seg, do, lse, delta)
  fold = lambda x, like: x.reshape(b, sp, hkv, cfg.group, d).sum(3).astype(like.dtype)
  return dq, fold(dk, k), fold(dv, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg: _Cfg, q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
  return _forward(cfg, q, k, v, q_seg, kv_seg)


def _attend_fwd(cfg: _Cfg, q, k, v, q_seg, kv_seg):
  o, lse = _forward(cfg, q, k, v, q_seg, kv_seg)
  return (o, lse), (q, k, v, q_seg, kv_seg, o, lse)


def _attend_bwd(cfg: _Cfg, res, cotangents):
  q, k, v, q_seg, kv_seg, o, lse = res
  do, dlse = cotangents
  dq, dk, dv = _backward(cfg, q, k, v, q_seg, kv_seg, o, lse, do, dlse)
  return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


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
  cfg = _Cfg(scale=scale, causal=causal, window=window, softcap=softcap, bq=bq, bk=bk,
             offset=s - t, group=hq // hkv, interpret=interpret)
  o, lse = _attend(cfg, qp, kp, vp, q_seg, kv_seg)
  o, lse = o[:, :t], lse[:, :, :t]
  return (o, lse) if return_lse else o
