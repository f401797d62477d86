"""flash_attention: the public entry point, its custom VJP and the choice of kernel.

Which kernel runs follows the platform being lowered for (jax.lax.platform_dependent), not the
default backend, so jax.export for "cuda" or "tpu" on a CPU host emits the real kernel:
- cuda, rocm: pallas_kernels.flash_gpu through Triton (that module says why Triton);
- tpu: pallas_kernels.flash_tpu through Mosaic TPU;
- anything else (CPU): flash_gpu's kernels in interpret mode.
interpret=True interprets a family anywhere: the GPU one, or the TPU one with platform="tpu".
Semantics are those of pallas_kernels.reference (bottom-right causal alignment for T != S; a
query that sees no key returns 0 and logsumexp -inf). Forward and backward are both Pallas.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from pallas_kernels import flash_gpu, flash_tpu
from pallas_kernels.blocks import Cfg
from pallas_kernels.reference import SegmentIds, split_segments

PLATFORMS = ("gpu", "tpu")


def _by_platform(cfg: Cfg, name: str, *args):
  """flash_gpu.<name> or flash_tpu.<name>, chosen for the platform being lowered for."""
  if cfg.interpret:
    return getattr(flash_tpu if cfg.platform == "tpu" else flash_gpu, name)(cfg, *args)
  interpreted = dataclasses.replace(cfg, interpret=True)
  gpu = functools.partial(getattr(flash_gpu, name), cfg)
  return jax.lax.platform_dependent(
      *args, cuda=gpu, rocm=gpu, tpu=functools.partial(getattr(flash_tpu, name), cfg),
      default=functools.partial(getattr(flash_gpu, name), interpreted))


def kernel(name: str, cfg: Cfg, *args: jax.Array) -> tuple[jax.Array, ...]:
  """The kernels' "forward" (q, k, v, q_seg, kv_seg -> o, lse) or "backward" (..., o, lse,
  do, dlse -> dq, dk, dv) for the platform being lowered for, no VJP around it: for callers
  that combine block pairs themselves (jmid.ring), with `cfg.offset` any integer."""
  return _by_platform(cfg, name, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg: Cfg, q, k, v, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
  return _by_platform(cfg, "forward", q, k, v, q_seg, kv_seg)


def _attend_fwd(cfg: Cfg, q, k, v, q_seg, kv_seg):
  o, lse = _by_platform(cfg, "forward", q, k, v, q_seg, kv_seg)
  return (o, lse), (q, k, v, q_seg, kv_seg, o, lse)


def _attend_bwd(cfg: Cfg, res, cotangents):
  dq, dk, dv = _by_platform(cfg, "backward", *res, *cotangents)
  return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "scale",
                                             "block_sizes", "interpret", "platform",
                                             "return_lse"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    segment_ids: SegmentIds = None, causal: bool = True,
                    window: int | None = None, softcap: float | None = None,
                    scale: float | None = None, block_sizes: tuple[int, int] | None = None,
                    interpret: bool | None = None, platform: str | None = None,
                    return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """o [B, T, Hq, D] (and logsumexp [B, Hq, T] float32 with return_lse).

  q [B, T, Hq, D]; k, v [B, S, Hkv, D] with Hq a multiple of Hkv; head_dim below 128 or a
  multiple of it. block_sizes = (query block, key block) for every kernel, default per
  platform (flash_gpu.FWD_BLOCKS/BWD_BLOCKS, flash_tpu.BLOCKS), capped at the lengths.
  interpret=None compiles the kernel on GPU/TPU and interprets the GPU family elsewhere;
  True interprets the family named by platform ("gpu", the default, or "tpu").
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
  if d > 128 and d % 128:
    raise ValueError(f"head_dim {d} must be below 128 or a multiple of 128")
  if platform not in (None, *PLATFORMS):
    raise ValueError(f"platform={platform!r}: use one of {PLATFORMS} or None")
  q_seg, kv_seg = split_segments(segment_ids, b, t, s)
  cfg = Cfg(scale=d ** -0.5 if scale is None else scale, causal=causal, window=window,
            softcap=softcap, offset=s - t, group=hq // hkv, block_sizes=block_sizes,
            interpret=bool(interpret), platform=platform)
  o, lse = _attend(cfg, q, k, v, q_seg, kv_seg)
  return (o, lse) if return_lse else o
