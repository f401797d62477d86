"""Ring attention: context parallelism for rows one device cannot hold.

Called inside shard_map with the sequence split over one mesh axis (`context`): each device
keeps its queries; K/V and their segment ids pass around the ring with ppermute, and the
partial outputs merge by logsumexp. The backward pass is a ring too (a custom VJP): dK/dV
travel with their chunks and are home after N steps, dQ stays.

Layouts. A row of T tokens is cut into equal chunks. 'contiguous': N chunks, device i holds
chunk i. 'zigzag' (the default): 2N chunks, device i holds chunks i and 2N-1-i, so under a
causal mask every device does the same work (its early chunk is cheap, its late one dear);
without it the last device does N times the first one's. `permutation` gives the order of the
row's tokens that puts each device's chunks in its slice: the data is laid out that way before
it reaches the step (tokens, targets, masks and positions alike, so the loss is unchanged).

Blocks. Each (query chunk, key chunk) pair is one call of a block function: the Pallas kernels
(`model.attention='pallas'`) or their jnp twin (pallas_kernels.reference.block_forward, 'xla').
Where the pair sits in the row is dynamic (it depends on the device and the ring step), but the
kernels take a static offset, so the pair's chunk distance picks one of a few compiled variants
with lax.switch: nothing visible (a future chunk under causality, or beyond the window: skipped,
no compute), the diagonal (causal), fully visible, or (with a window) one per distance.

Overlap: each step issues the next ppermute before computing on the current chunk, so XLA may
run the transfer under the compute (asynchronous collective-permute on GPU and TPU). On these
CPU test machines that cannot be measured; benchmarks/attention.py has a ring mode for a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmid.config import CONTEXT_LAYOUTS as LAYOUTS
from pallas_kernels import reference
from pallas_kernels.blocks import Cfg
from pallas_kernels.flash_attention import kernel


def chunk_ids(layout: str, n: int) -> np.ndarray:
  """[n, k] int32: the row chunks device i holds, in the order of its slice."""
  if layout == "zigzag":
    return np.array([[i, 2 * n - 1 - i] for i in range(n)], np.int32)
  if layout == "contiguous":
    return np.arange(n, dtype=np.int32)[:, None]
  raise ValueError(f"unknown ring layout {layout!r}; choose one of {LAYOUTS}")


def permutation(layout: str, n: int, t: int) -> np.ndarray:
  """[t] int: row[:, permutation(...)] puts each device's chunks, in order, in its slice."""
  ids = chunk_ids(layout, n)
  c = t // ids.size
  if c * ids.size != t:
    raise ValueError(f"a row of {t} tokens does not split into {ids.size} equal chunks")
  return np.concatenate([np.arange(k * c, (k + 1) * c) for k in ids.reshape(-1)])


@dataclasses.dataclass(frozen=True)
class Ring:
  """What is static about one ring call (hashable: it keys the custom VJP)."""

  axis: str  # the mesh axis the sequence is split over
  n: int  # its size
  layout: str
  block: Cfg  # the kernel call of a whole block pair at offset 0
  pallas: bool  # the Pallas kernels, else their jnp twin


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                   axis: str, n: int, layout: str = "zigzag", causal: bool = True,
                   window: int = 0, scale: float | None = None, softcap: float = 0.0,
                   implementation: str = "xla",
                   interpret: bool = False) -> jax.Array:
  """One device's slice of attention over the whole row, inside shard_map.

  q [B, Tl, Hq, D], k and v [B, Tl, Hkv, D], segment_ids [B, Tl]: this device's slice of rows
  laid out by `permutation(layout, n, T)`; returns o [B, Tl, Hq, D] in the same layout.
  `implementation` is 'pallas' (the kernels; interpret=True runs them interpreted) or 'xla'.
  """
  d = q.shape[-1]
  block = Cfg(scale=d ** -0.5 if scale is None else scale, causal=causal, window=window or None,
              softcap=softcap or None, offset=0, group=q.shape[2] // k.shape[2], block_sizes=None,
              interpret=interpret, platform=None)
  seg = segment_ids.astype(jnp.int32)
  return _ring(Ring(axis, n, layout, block, implementation == "pallas"), q, k, v, seg, seg)


def pair_cfgs(block: Cfg, m: int, c: int) -> tuple[list[Cfg | None], np.ndarray]:
  """The distinct block calls of chunk pairs (None: nothing visible) and, for each chunk
  distance d = query chunk - key chunk in [-(m-1), m-1], the index of its call."""
  calls: list[Cfg | None] = []
  table = []
  for dist in range(-(m - 1), m):
    offset = dist * c  # query i sits at key position i + offset
    if (block.causal and offset + c - 1 < 0) or (block.window and offset - c + 1 >= block.window):
      call = None
    elif not block.window and (not block.causal or offset - c + 1 >= 0):
      call = dataclasses.replace(block, causal=False, offset=0)  # every pair visible
    else:
      call = dataclasses.replace(block, offset=offset)
    if call not in calls:
      calls.append(call)
    table.append(calls.index(call))
  return calls, np.array(table, np.int32)


def _blocks(r: Ring, name: str) -> Callable[..., Any]:
  return functools.partial(kernel, name) if r.pallas else getattr(reference, f"block_{name}")


def _pair(r: Ring, name: str, calls: list[Cfg | None], branch: jax.Array, *args: jax.Array
          ) -> Any:
  """`name` ('forward' or 'backward') of one chunk pair, by the call its distance picks."""
  fn = _blocks(r, name)
  q, k, v = args[:3]

  def nothing(*a: jax.Array) -> Any:
    if name == "forward":
      return (jnp.zeros_like(q), jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf,
                                          jnp.float32))
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)

  fns = [nothing if cfg is None else functools.partial(fn, cfg) for cfg in calls]
  if len(fns) == 1:
    return fns[0](*args)
  return jax.lax.switch(branch, fns, *args)


def _chunks(x: jax.Array, k: int, axis: int = 1) -> list[jax.Array]:
  return jnp.split(x, k, axis=axis)


def _merge(o: jax.Array, lse: jax.Array, o_b: jax.Array, lse_b: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
  """Two partial attentions of the same queries (o [B, T, H, D] f32, lse [B, H, T]) as one."""
  new = jnp.logaddexp(lse, lse_b)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  w = lambda l: jnp.exp(l - safe).transpose(0, 2, 1)[..., None]  # noqa: E731
  return o * w(lse) + o_b.astype(jnp.float32) * w(lse_b), new


def _shift(r: Ring, x: Any) -> Any:
  """Every device passes `x` to the next one on the ring."""
  return jax.lax.ppermute(x, r.axis, [(j, (j + 1) % r.n) for j in range(r.n)])


def _setup(r: Ring, q: jax.Array) -> tuple[jax.Array, jax.Array, int, list[Cfg | None],
                                           jax.Array]:
  ids = jnp.asarray(chunk_ids(r.layout, r.n))
  kk = ids.shape[1]
  c = q.shape[1] // kk
  calls, table = pair_cfgs(r.block, ids.size, c)
  return ids, jax.lax.axis_index(r.axis), kk, calls, jnp.asarray(table)


def _forward(r: Ring, q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
  ids, me, kk, calls, table = _setup(r, q)
  qs, q_segs = _chunks(q, kk), _chunks(q_seg, kk)
  o = [jnp.zeros(x.shape, jnp.float32) for x in qs]
  lse = [jnp.full((x.shape[0], x.shape[2], x.shape[1]), -jnp.inf, jnp.float32) for x in qs]
  kv = (k, v, kv_seg)
  for step in range(r.n):
    src = (me - step) % r.n  # whose chunks this device holds now
    nxt = _shift(r, kv) if step < r.n - 1 else None  # in flight while this step computes
    ks, vs, k_segs = (_chunks(x, kk) for x in kv)
    for a in range(kk):
      for b in range(kk):
        branch = table[ids[me, a] - ids[src, b] + ids.size - 1]
        o_ab, lse_ab = _pair(r, "forward", calls, branch, qs[a], ks[b], vs[b], q_segs[a],
                             k_segs[b])
        o[a], lse[a] = _merge(o[a], lse[a], o_ab, lse_ab)
    kv = nxt
  return jnp.concatenate(o, 1).astype(q.dtype), jnp.concatenate(lse, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(r: Ring, q, k, v, q_seg, kv_seg) -> jax.Array:
  return _forward(r, q, k, v, q_seg, kv_seg)[0]


def _ring_fwd(r: Ring, q, k, v, q_seg, kv_seg):
  o, lse = _forward(r, q, k, v, q_seg, kv_seg)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _ring_bwd(r: Ring, res, do):
  q, k, v, q_seg, kv_seg, o, lse = res
  ids, me, kk, calls, table = _setup(r, q)
  qs, q_segs, os_, dos = (_chunks(x, kk) for x in (q, q_seg, o, do))
  lses = _chunks(lse, kk, axis=2)
  dq = [jnp.zeros(x.shape, jnp.float32) for x in qs]
  kv = (k, v, kv_seg)
  dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for step in range(r.n):
    src = (me - step) % r.n
    nxt = _shift(r, kv) if step < r.n - 1 else None
    ks, vs, k_segs = (_chunks(x, kk) for x in kv)
    dks, dvs = _chunks(dkv[0], kk), _chunks(dkv[1], kk)
    for a in range(kk):
      for b in range(kk):
        branch = table[ids[me, a] - ids[src, b] + ids.size - 1]
        dq_ab, dk_ab, dv_ab = _pair(r, "backward", calls, branch, qs[a], ks[b], vs[b],
                                    q_segs[a], k_segs[b], os_[a], lses[a], dos[a],
                                    jnp.zeros_like(lses[a]))
        dq[a] = dq[a] + dq_ab.astype(jnp.float32)
        dks[b] = dks[b] + dk_ab.astype(jnp.float32)
        dvs[b] = dvs[b] + dv_ab.astype(jnp.float32)
    # the gradients of the chunks held now travel on with them: after n shifts they are home
    dkv = _shift(r, (jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1)))
    kv = nxt
  return (jnp.concatenate(dq, 1).astype(q.dtype), dkv[0].astype(k.dtype),
          dkv[1].astype(v.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)
