"""Flash attention kernels for TPU (Mosaic TPU).

Layout [B, H, T, D], so every block's last two dims are (block, head_dim) and meet the (8, 128)
tiling rule; the grid is (batch, query head, query block, key block) with the last axis
sequential ("arbitrary") and the running max, sum and accumulator in VMEM scratch, so Mosaic
pipelines the K/V DMAs. Per-row vectors (max, sum, logsumexp, delta, query segment ids) live
128 lanes wide and key segment ids 8 sublanes high, the shapes Mosaic tiles natively (as JAX's
own TPU flash attention does); the kernels return the logsumexp compact, [B, H, T].

Skipping: a [B, n_q, n_kv] block mask (blocks.block_mask: causality, window, segment ranges)
is prefetched into SMEM. It gates the compute with pl.when, and the index maps clamp the
streamed block to the visible range, so a skipped step re-uses the resident block and costs no
DMA. The backward runs a dq kernel (key blocks sequential) and a dk/dv kernel (query blocks
sequential) per query head; dk and dv are summed over each GQA group afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.blocks import (PAD_KV, PAD_Q, Cfg, block_mask, fit, kv_range, logits,
                                   pad, probs_and_dlogits, q_range)

LANES, SUBLANES = 128, 8
BLOCKS = (512, 512)  # (query, key); JAX's TPU kernels default to 512 as well
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _wide(x: jax.Array, n: int) -> jax.Array:
  """A lane-replicated [rows, 128] array as [rows, n]."""
  return jnp.tile(x, (1, n // LANES)) if n >= LANES else x[:, :n]


def _mask(cfg: Cfg, qs_ref, ks_ref, i: jax.Array, j: jax.Array, bq: int,
          bk: int) -> jax.Array:
  shape = (bq, bk)
  mask = _wide(qs_ref[...], bk) == ks_ref[:1, :]
  q_pos = i * bq + cfg.offset + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  if cfg.causal:
    mask &= k_pos <= q_pos
  if cfg.window:
    mask &= q_pos - k_pos < cfg.window
  return mask


def _fwd_kernel(bm_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_scr, l_scr,
                acc_scr, *, cfg: Cfg, bq: int, bk: int) -> None:
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(bm_ref[b, i, j] != 0)
  def _compute():
    mask = _mask(cfg, qs_ref, ks_ref, i, j, bq, bk)
    s = jnp.where(mask, logits(cfg, q_ref[...], k_ref[...]), -jnp.inf)
    m_prev = m_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(s - _wide(m_safe, bk))
    alpha = jnp.exp(m_prev - m_safe)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    d = acc_scr.shape[1]
    acc_scr[...] = _wide(alpha, d) * acc_scr[...] + jax.lax.dot_general(
        p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l, d = l_scr[...], acc_scr.shape[1]
    seen = l > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_scr[...] * _wide(inv, d)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _dq_kernel(bm_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dq_scr, *, cfg: Cfg, bq: int, bk: int) -> None:
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(bm_ref[b, i, j] != 0)
  def _compute():
    mask = _mask(cfg, qs_ref, ks_ref, i, j, bq, bk)
    k = k_ref[...]
    _, ds = probs_and_dlogits(cfg, q_ref[...], k, v_ref[...], do_ref[...],
                              _wide(lse_ref[...], bk), _wide(delta_ref[...], bk), mask)
    dq_scr[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(bm_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: Cfg, bq: int, bk: int) -> None:
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(bm_ref[b, i, j] != 0)
  def _compute():
    mask = _mask(cfg, qs_ref, ks_ref, i, j, bq, bk)
    q, do = q_ref[...], do_ref[...]
    p, ds = probs_and_dlogits(cfg, q, k_ref[...], v_ref[...], do, _wide(lse_ref[...], bk),
                              _wide(delta_ref[...], bk), mask)
    tn = (((0,), (0,)), ((), ()))  # contract the query axis: p^T do, ds^T q
    dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                       preferred_element_type=jnp.float32)
    dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                       preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...]
    dv_ref[...] = dv_scr[...]


def _clamp(x: jax.Array, lo, hi, n: int) -> jax.Array:
  """x held inside [lo, hi) and [0, n): a skipped step keeps the last visible block."""
  return jnp.clip(jnp.minimum(jnp.maximum(x, lo), hi - 1), 0, n - 1)


def _specs(cfg: Cfg, bq: int, bk: int, n_q: int, n_kv: int, d: int, by_kv: bool
           ) -> dict[str, pl.BlockSpec]:
  """BlockSpecs over (b, h, outer, inner) + the block mask; by_kv: keys are the outer axis."""
  sq, g = pl.squeezed, cfg.group

  def ij(o, n):  # (query block, key block) this step streams
    if by_kv:
      return _clamp(n, *q_range(cfg, o, n_q, bq, bk), n_q), o
    return o, _clamp(n, *kv_range(cfg, o, n_kv, bq, bk), n_kv)

  def spec(shape, at):
    return pl.BlockSpec(shape, lambda b, h, o, n, bm: at(b, h, *ij(o, n)))

  return dict(
      q=spec((sq, sq, bq, d), lambda b, h, i, j: (b, h, i, 0)),
      kv=spec((sq, sq, bk, d), lambda b, h, i, j: (b, jax.lax.div(h, g), j, 0)),
      qs=spec((sq, bq, LANES), lambda b, h, i, j: (b, i, 0)),
      ks=spec((sq, SUBLANES, bk), lambda b, h, i, j: (b, 0, j)),
      row=spec((sq, sq, bq, LANES), lambda b, h, i, j: (b, h, i, 0)),
      grad_kv=spec((sq, sq, bk, d), lambda b, h, i, j: (b, h, j, 0)))


def _prepare(cfg: Cfg, q, k, v, q_seg, kv_seg):
  """Blocks, padded [B, H, T, D] operands, tiled segment ids and the block mask."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  bq, bk = cfg.block_sizes or BLOCKS
  bq, bk = fit(bq, t, SUBLANES), fit(bk, s, LANES)
  q_seg, kv_seg = pad(q_seg, 1, bq, PAD_Q), pad(kv_seg, 1, bk, PAD_KV)
  heads_first = lambda x, blk: pad(x, 1, blk).transpose(0, 2, 1, 3)
  qs = jnp.broadcast_to(q_seg[:, :, None], (*q_seg.shape, LANES))
  ks = jnp.broadcast_to(kv_seg[:, None, :], (b, SUBLANES, kv_seg.shape[1]))
  bm = block_mask(cfg, q_seg, kv_seg, bq, bk)
  return (bq, bk), bm, heads_first(q, bq), heads_first(k, bk), heads_first(v, bk), qs, ks


def _call(cfg: Cfg, kernel, name: str, grid, in_specs, out_specs, out_shape, scratch):
  return pl.pallas_call(
      kernel, out_shape=out_shape, interpret=cfg.interpret, name=f"jmid_flash_attention_{name}",
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid,
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=scratch),
      compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS))


def forward(cfg: Cfg, q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, Hq, D], logsumexp [B, Hq, T] float32) for unpadded inputs."""
  (b, t, hq, d) = q.shape
  (bq, bk), bm, qh, kh, vh, qs, ks = _prepare(cfg, q, k, v, q_seg, kv_seg)
  n_q, n_kv = qh.shape[2] // bq, kh.shape[2] // bk
  sp = _specs(cfg, bq, bk, n_q, n_kv, d, by_kv=False)
  f32 = jnp.float32
  o, lse = _call(
      cfg, functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk), "fwd", (b, hq, n_q, n_kv),
      [sp["q"], sp["kv"], sp["kv"], sp["qs"], sp["ks"]], [sp["q"], sp["row"]],
      [jax.ShapeDtypeStruct(qh.shape, q.dtype),
       jax.ShapeDtypeStruct((b, hq, qh.shape[2], LANES), f32)],
      [pltpu.VMEM((bq, LANES), f32), pltpu.VMEM((bq, LANES), f32), pltpu.VMEM((bq, d), f32)],
  )(bm, qh, kh, vh, qs, ks)
  return o.transpose(0, 2, 1, 3)[:, :t], lse[:, :, :t, 0]


def backward(cfg: Cfg, q, k, v, q_seg, kv_seg, o, lse, do, dlse
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) for unpadded inputs; dlse is the logsumexp's cotangent."""
  (b, t, hq, d), (s, hkv) = q.shape, k.shape[1:3]
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
  (bq, bk), bm, qh, kh, vh, qs, ks = _prepare(cfg, q, k, v, q_seg, kv_seg)
  doh = pad(do, 1, bq).transpose(0, 2, 1, 3)
  lanes = lambda x: jnp.broadcast_to(pad(x, 2, bq)[..., None], (*qh.shape[:3], LANES))
  n_q, n_kv = qh.shape[2] // bq, kh.shape[2] // bk
  args = (bm, qh, kh, vh, qs, ks, doh, lanes(lse), lanes(delta))
  f32 = jnp.float32
  by_q = _specs(cfg, bq, bk, n_q, n_kv, d, by_kv=False)
  dq = _call(
      cfg, functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk), "dq", (b, hq, n_q, n_kv),
      [by_q[n] for n in ("q", "kv", "kv", "qs", "ks", "q", "row", "row")], by_q["q"],
      jax.ShapeDtypeStruct(qh.shape, q.dtype), [pltpu.VMEM((bq, d), f32)],
  )(*args)
  by_k = _specs(cfg, bq, bk, n_q, n_kv, d, by_kv=True)
  per_head = jax.ShapeDtypeStruct((b, hq, kh.shape[2], d), f32)
  dk, dv = _call(
      cfg, functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk), "dkv", (b, hq, n_kv, n_q),
      [by_k[n] for n in ("q", "kv", "kv", "qs", "ks", "q", "row", "row")],
      [by_k["grad_kv"], by_k["grad_kv"]], [per_head, per_head],
      [pltpu.VMEM((bk, d), f32), pltpu.VMEM((bk, d), f32)],
  )(*args)
  fold = lambda x, like: (x[:, :, :s].reshape(b, hkv, cfg.group, s, d).sum(2)
                          .transpose(0, 2, 1, 3).astype(like.dtype))
  return dq.transpose(0, 2, 1, 3)[:, :t], fold(dk, k), fold(dv, v)
