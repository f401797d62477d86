"""Flash attention kernels for GPUs (the Triton lowering), also the ones interpreted on CPU.

Forward: one program per (batch, query head, query block) streams the key/value blocks with
the online softmax in float32. Backward (FlashAttention-2): one program per (batch, query head,
key block) accumulates dk, dv over the query blocks that see it, and one per query block
accumulates dq; both recompute p from the saved logsumexp. Key blocks outside causality or the
window are never visited (loop bounds); a block pair in which segment ids hide every pair is
skipped with lax.cond. GQA reads the shared kv head (h // group) through the index map, so K/V
are never repeated; dk and dv come out per query head and are summed over each group.

Why Triton and not Mosaic GPU (the jax default since 0.9): this kernel (segment masks, a
data-dependent skip, GQA index maps) lowers through Triton on every jax we support (0.10 and
0.12; export tests pin it), while Mosaic GPU refuses it at the first iota (its layouts must be
cast by hand) and a fast Mosaic GPU attention is a different program (warpgroup matmuls, TMA,
warp specialisation) that cannot be checked without a Hopper. Triton is deprecated upstream,
so a Mosaic GPU kernel is the follow-up once a GPU is lent to measure both.

That choice is made here, once: jax (from 0.11) warns at every Triton lowering that the backend
is deprecated, so that one warning is filtered below. Should jax make the deprecation an error
(jax._src.deprecations "accelerated"), triton_usable() says so and jmid's attention='auto'
stops choosing this kernel on GPUs; 'pallas' on a GPU then fails in jax with its own words.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.blocks import (PAD_KV, PAD_Q, Cfg, fit, kv_range, logits, mm, pad,
                                   probs_and_dlogits, q_range)

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)


def triton_usable() -> bool:
  """False once jax turns its Triton deprecation into an error."""
  try:
    from jax._src import deprecations
    return not deprecations.is_accelerated("jax-pallas-triton")
  except (ImportError, ValueError):  # jax before the deprecation registered it: usable
    return True


FWD_BLOCKS, BWD_BLOCKS = (128, 64), (64, 64)  # (query, key); untuned until a GPU is lent


def _warps(d: int) -> int:
  return 4 if d <= 64 else 8


def _any(mask: jax.Array) -> jax.Array:
  """jnp.any without reduce_or, which the Triton lowering lacks."""
  return jnp.max(mask.astype(jnp.int32)) > 0


def _mask(cfg: Cfg, q_seg: jax.Array, k_seg: jax.Array, q_pos: jax.Array,
          k_pos: jax.Array) -> jax.Array:
  mask = q_seg[:, None] == k_seg[None, :]
  if cfg.causal:
    mask &= k_pos[None, :] <= q_pos[:, None]
  if cfg.window:
    mask &= q_pos[:, None] - k_pos[None, :] < cfg.window
  return mask


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, cfg: Cfg, bq: int,
                bk: int, n_kv: int) -> None:
  """One query block against the key blocks it can see (online softmax)."""
  i = pl.program_id(2)
  q = q_ref[...]  # [bq, D]
  q_seg, q_pos = qs_ref[...], i * bq + jnp.arange(bq) + cfg.offset

  def visit(j: jax.Array, carry: tuple) -> tuple:
    ks = pl.ds(j * bk, bk)
    mask = _mask(cfg, q_seg, ks_ref[ks], q_pos, j * bk + jnp.arange(bk))

    def compute(carry: tuple) -> tuple:
      m, l, acc = carry
      v = v_ref[ks, :]
      s = jnp.where(mask, logits(cfg, q, k_ref[ks, :]), -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[:, None])
      alpha = jnp.exp(m - m_safe)
      return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + mm(
          p.astype(v.dtype), v, (1, 0))

    return jax.lax.cond(_any(mask), compute, lambda c: c, carry)

  init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(*kv_range(cfg, i, n_kv, bq, bk), visit, init)
  seen = l > 0
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None],
                         0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: Cfg, bq: int, bk: int, n_kv: int) -> None:
  i = pl.program_id(2)
  q = q_ref[...]
  q_seg, q_pos = qs_ref[...], i * bq + jnp.arange(bq) + cfg.offset
  do, lse, delta = do_ref[...], lse_ref[...][:, None], delta_ref[...][:, None]

  def visit(j: jax.Array, dq: jax.Array) -> jax.Array:
    ks = pl.ds(j * bk, bk)
    mask = _mask(cfg, q_seg, ks_ref[ks], q_pos, j * bk + jnp.arange(bk))

    def compute(dq: jax.Array) -> jax.Array:
      k = k_ref[ks, :]
      _, ds = probs_and_dlogits(cfg, q, k, v_ref[ks, :], do, lse, delta, mask)
      return dq + mm(ds.astype(k.dtype), k, (1, 0))

    return jax.lax.cond(_any(mask), compute, lambda d: d, dq)

  dq = jax.lax.fori_loop(*kv_range(cfg, i, n_kv, bq, bk), visit,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, cfg: Cfg, bq: int, bk: int, n_q: int) -> None:
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_seg, k_pos = ks_ref[...], j * bk + jnp.arange(bk)

  def visit(i: jax.Array, carry: tuple) -> tuple:
    qs = pl.ds(i * bq, bq)
    mask = _mask(cfg, qs_ref[qs], k_seg, i * bq + jnp.arange(bq) + cfg.offset, k_pos)

    def compute(carry: tuple) -> tuple:
      dk, dv = carry
      q, do = q_ref[qs, :], do_ref[qs, :]
      p, ds = probs_and_dlogits(cfg, q, k, v, do, lse_ref[qs][:, None],
                                 delta_ref[qs][:, None], mask)
      return dk + mm(ds.astype(q.dtype), q, (0, 0)), dv + mm(p.astype(do.dtype), do, (0, 0))

    return jax.lax.cond(_any(mask), compute, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(*q_range(cfg, j, n_q, bq, bk), visit, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(cfg: Cfg, bq: int, bk: int, tp: int, sp: int, d: int,
           by_kv: bool) -> dict[str, pl.BlockSpec]:
  """BlockSpecs over the grid (b, q head, block): blocked along queries, or along keys."""
  sq, g = pl.squeezed, cfg.group
  if by_kv:
    q_block = pl.BlockSpec((sq, tp, sq, d), lambda b, h, j: (b, 0, h, 0))
    kv_block = pl.BlockSpec((sq, bk, sq, d), lambda b, h, j: (b, j, h // g, 0))
    return dict(q=q_block, kv=kv_block, qs=pl.BlockSpec((sq, tp), lambda b, h, j: (b, 0)),
                ks=pl.BlockSpec((sq, bk), lambda b, h, j: (b, j)),
                row=pl.BlockSpec((sq, sq, tp), lambda b, h, j: (b, h, 0)),
                grad_kv=pl.BlockSpec((sq, bk, sq, d), lambda b, h, j: (b, j, h, 0)))
  return dict(q=pl.BlockSpec((sq, bq, sq, d), lambda b, h, i: (b, i, h, 0)),
              kv=pl.BlockSpec((sq, sp, sq, d), lambda b, h, i: (b, 0, h // g, 0)),
              qs=pl.BlockSpec((sq, bq), lambda b, h, i: (b, i)),
              ks=pl.BlockSpec((sq, sp), lambda b, h, i: (b, 0)),
              row=pl.BlockSpec((sq, sq, bq), lambda b, h, i: (b, h, i)))


def _blocks(cfg: Cfg, t: int, s: int, default: tuple[int, int]) -> tuple[int, int]:
  bq, bk = cfg.block_sizes or default
  return fit(bq, t, 16), fit(bk, s, 16)  # Triton's dots want at least 16 rows


def _call(cfg: Cfg, kernel, name: str, d: int, **kw):
  params = None if cfg.interpret else pltr.CompilerParams(num_warps=_warps(d), num_stages=2)
  return pl.pallas_call(kernel, interpret=cfg.interpret, compiler_params=params,
                        name=f"jmid_flash_attention_{name}", **kw)


def forward(cfg: Cfg, q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, Hq, D], logsumexp [B, Hq, T] float32) for unpadded inputs."""
  (b, t, hq, d), s = q.shape, k.shape[1]
  bq, bk = _blocks(cfg, t, s, FWD_BLOCKS)
  q, q_seg = pad(q, 1, bq), pad(q_seg, 1, bq, PAD_Q)
  k, v, kv_seg = pad(k, 1, bk), pad(v, 1, bk), pad(kv_seg, 1, bk, PAD_KV)
  tp, sp = q.shape[1], k.shape[1]
  sp_ = _specs(cfg, bq, bk, tp, sp, d, by_kv=False)
  o, lse = _call(
      cfg, functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, n_kv=sp // bk), "fwd", d,
      grid=(b, hq, tp // bq),
      in_specs=[sp_["q"], sp_["kv"], sp_["kv"], sp_["qs"], sp_["ks"]],
      out_specs=[sp_["q"], sp_["row"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
  )(q, k, v, q_seg, kv_seg)
  return o[:, :t], lse[:, :, :t]


def backward(cfg: Cfg, q, k, v, q_seg, kv_seg, o, lse, do, dlse
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) for unpadded inputs; dlse is the logsumexp's cotangent."""
  (b, t, hq, d), (s, hkv) = q.shape, k.shape[1:3]
  bq, bk = _blocks(cfg, t, s, BWD_BLOCKS)
  # d lse_i / d s_ij = p_ij, so a cotangent on lse enters exactly like -delta
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
  q, do, q_seg = pad(q, 1, bq), pad(do, 1, bq), pad(q_seg, 1, bq, PAD_Q)
  lse, delta = pad(lse, 2, bq), pad(delta, 2, bq)
  kp, vp, kv_seg = pad(k, 1, bk), pad(v, 1, bk), pad(kv_seg, 1, bk, PAD_KV)
  tp, sp = q.shape[1], kp.shape[1]
  args = (q, kp, vp, q_seg, kv_seg, do, lse, delta)
  by_q = _specs(cfg, bq, bk, tp, sp, d, by_kv=False)
  dq = _call(
      cfg, functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk, n_kv=sp // bk), "dq", d,
      grid=(b, hq, tp // bq),
      in_specs=[by_q[n] for n in ("q", "kv", "kv", "qs", "ks", "q", "row", "row")],
      out_specs=by_q["q"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
  )(*args)
  by_k = _specs(cfg, bq, bk, tp, sp, d, by_kv=True)
  per_head = jax.ShapeDtypeStruct((b, sp, hq, d), jnp.float32)
  dk, dv = _call(
      cfg, functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk, n_q=tp // bq), "dkv", d,
      grid=(b, hq, sp // bk),
      in_specs=[by_k[n] for n in ("q", "kv", "kv", "qs", "ks", "q", "row", "row")],
      out_specs=[by_k["grad_kv"], by_k["grad_kv"]], out_shape=[per_head, per_head],
  )(*args)
  fold = lambda x, like: x[:, :s].reshape(b, s, hkv, cfg.group, d).sum(3).astype(like.dtype)
  return dq[:, :t], fold(dk, k), fold(dv, v)
