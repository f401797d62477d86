"""What the GPU and TPU kernels share: the static call description, which block pairs can
see each other, padding to whole blocks, and the math of one block pair."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PAD_Q, PAD_KV = -2, -1  # segment ids of padding: they match nothing real, nor each other


@dataclasses.dataclass(frozen=True)
class Cfg:
  """Everything static about one call (hashable: it keys the custom VJP)."""

  scale: float
  causal: bool
  window: int | None
  softcap: float | None
  offset: int  # S - T: query i sits at key position i + offset
  group: int  # query heads per kv head
  block_sizes: tuple[int, int] | None  # (query, key); None: the platform's default
  interpret: bool
  platform: str | None  # the kernel family to interpret: "gpu" or "tpu"; None dispatches


def _div(x: jax.Array | int, y: int) -> jax.Array:
  """max(x, 0) // y without floor division's sign op, which Mosaic TPU lowers only on a TPU."""
  return jax.lax.div(jnp.maximum(jnp.asarray(x, jnp.int32), 0), jnp.int32(y))


def kv_range(cfg: Cfg, i: jax.Array, n_kv: int, bq: int, bk: int
             ) -> tuple[jax.Array | int, jax.Array | int]:
  """The key blocks query block i can see: [lo, hi)."""
  lo, hi = 0, n_kv
  if cfg.causal:  # its last query sits at key position (i + 1) * bq - 1 + offset
    hi = jnp.minimum(_div((i + 1) * bq + cfg.offset + bk - 1, bk), n_kv)
  if cfg.window:  # its first query sees back to i * bq + offset - window + 1
    lo = jnp.minimum(_div(i * bq + cfg.offset - cfg.window + 1, bk), n_kv)
  return lo, hi


def q_range(cfg: Cfg, j: jax.Array, n_q: int, bq: int, bk: int
            ) -> tuple[jax.Array | int, jax.Array | int]:
  """The query blocks that can see key block j: [lo, hi)."""
  lo, hi = 0, n_q
  if cfg.causal:  # a query sees key j * bk once its position i + offset reaches it
    lo = jnp.minimum(_div(j * bk - cfg.offset, bq), n_q)
  if cfg.window:  # and stops once i + offset - window + 1 passes the block's last key
    last = (j + 1) * bk - 2 + cfg.window - cfg.offset  # floor(last / bq) is its last block
    hi = jnp.where(last < 0, 0, jnp.minimum(_div(last, bq) + 1, n_q))
  return lo, hi


def block_mask(cfg: Cfg, q_seg: jax.Array, kv_seg: jax.Array, bq: int, bk: int) -> jax.Array:
  """[B, n_q, n_kv] int32, 0 where the block pair has no visible query-key pair.

  Exact for causality and the window. Segments are compared by each block's range of ids
  (padding left out): exact for packed rows (ids that never decrease) on their own, and in
  general only ever errs towards computing a block, whose elements are masked one by one.
  """
  b, n_q, n_kv = q_seg.shape[0], q_seg.shape[1] // bq, kv_seg.shape[1] // bk
  big = jnp.iinfo(jnp.int32).max

  def bounds(seg: jax.Array, pad: int, n: int) -> tuple[jax.Array, jax.Array]:
    seg = seg.reshape(b, n, -1)
    real = seg != pad
    return (jnp.min(jnp.where(real, seg, big), -1), jnp.max(jnp.where(real, seg, -big), -1))

  q_lo, q_hi = bounds(q_seg, PAD_Q, n_q)
  k_lo, k_hi = bounds(kv_seg, PAD_KV, n_kv)
  overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
  i, j = jnp.arange(n_q)[:, None], jnp.arange(n_kv)[None, :]
  lo, hi = kv_range(cfg, i, n_kv, bq, bk)
  return (overlap & ((j >= lo) & (j < hi))[None]).astype(jnp.int32)


def pad(x: jax.Array, axis: int, to: int, value: int | float = 0) -> jax.Array:
  extra = -x.shape[axis] % to
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def fit(block: int, length: int, multiple: int) -> int:
  """The block size capped at the length rounded up to `multiple` (a short input, one block)."""
  return min(block, -(-length // multiple) * multiple)


def mm(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """a . b over the given dims, in the inputs' dtype with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


def logits(cfg: Cfg, q: jax.Array, k: jax.Array) -> jax.Array:
  """[bq, bk] float32 scaled logits of a query block against a key block, softcapped."""
  s = mm(q, k, (1, 1)) * cfg.scale
  return cfg.softcap * jnp.tanh(s / cfg.softcap) if cfg.softcap else s


def probs_and_dlogits(cfg: Cfg, q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
                      lse: jax.Array, delta: jax.Array, mask: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """(p, d loss / d (q.k)) for one block pair, recomputed from the logsumexp.

  lse and delta are per query, shaped to broadcast against [bq, bk] ([bq, 1] or [bq, bk]).
  """
  s = logits(cfg, q, k)
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
  ds = p * (mm(do, v, (1, 1)) - delta)
  if cfg.softcap:  # s = c tanh(x / c): ds/dx = 1 - (s / c)^2
    ds = ds * (1.0 - jnp.square(s / cfg.softcap))
  return p, ds * cfg.scale
