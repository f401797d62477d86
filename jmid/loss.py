"""Cross-entropy through the LM head, in chunks of tokens, never holding [tokens, vocab] whole.

The plain loss materialises float32 logits for every token (8192 tokens x 128256 vocab is
4.2 GB), and autodiff keeps them, the softmax and the logits' gradient alive together. Here a
custom VJP walks the tokens in chunks: the forward keeps only one float32 logsumexp per token;
the backward recomputes each chunk's logits (one more LM-head matmul, ~2% of a 1B model's
FLOPs) and turns them straight into that chunk's input and head gradients. Matmuls take the
compute dtype with float32 accumulation; softmax, logsumexp and the sums are float32.

Chunks are strided (chunk i holds positions i, i+n, i+2n, ... of every row), so each keeps the
rows' batch and length sharding: no device gathers another's tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def n_chunks(seq_len: int, chunk: int, context: int = 1) -> int:
  """How many chunks a row of seq_len splits into for about `chunk` positions each: n divides
  seq_len, and seq_len / n divides by `context` (the devices the rows' length is split over),
  so every chunk has one shape and its own share on every device."""
  n = max(1, seq_len // max(chunk, 1))
  while seq_len % n or (seq_len // n) % context:
    n -= 1
  return n


def plain(x_bte: jax.Array, head_ev: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array,
          softcap: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy sum, z sum) over masked tokens, with all logits at once: the reference."""
  return _sums(logits(x_bte, head_ev, softcap), targets_bt, mask_bt)[:2]


def _sums(logits: jax.Array, targets: jax.Array, mask: jax.Array
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - target_logit) * mask), jnp.sum(jnp.square(logz) * mask), logz


def _strided(a: jax.Array, n: int) -> jax.Array:
  """[B, T, ...] -> [n, B, T/n, ...]: chunk i holds positions i, i+n, ... of every row."""
  b, t = a.shape[:2]
  return jnp.moveaxis(a.reshape(b, t // n, n, *a.shape[2:]), 2, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def chunked(x_bte: jax.Array, head_ev: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array,
            n: int, softcap: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy sum, z sum) over masked tokens (mask float32), in n chunks of positions."""
  return _forward(x_bte, head_ev, targets_bt, mask_bt, n, softcap)[0]


def logits(x_bte: jax.Array, head_ev: jax.Array, softcap: float = 0.0) -> jax.Array:
  """The LM head: a matmul in the hidden states' (compute) dtype, accumulated in float32;
  softcap c > 0 caps them to c tanh(logits / c) (Gemma 2's final_logit_softcapping)."""
  out = jnp.einsum("bte,ev->btv", x_bte, head_ev.astype(x_bte.dtype),
                   preferred_element_type=jnp.float32)
  return softcap * jnp.tanh(out / softcap) if softcap else out


def _forward(x_bte: jax.Array, head_ev: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array,
             n: int, softcap: float) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  def body(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array]:
    x, targets, mask = xs
    ce, z, logz = _sums(logits(x, head_ev, softcap), targets, mask)
    return (carry[0] + ce, carry[1] + z), logz
  zero = jnp.zeros((), jnp.float32)
  sums, logz = jax.lax.scan(body, (zero, zero), (_strided(x_bte, n), _strided(targets_bt, n),
                                                 _strided(mask_bt, n)))
  return sums, logz  # logz: [n, B, T/n] float32


def _fwd(x_bte: jax.Array, head_ev: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array,
         n: int, softcap: float) -> tuple[tuple[jax.Array, jax.Array], tuple]:
  sums, logz = _forward(x_bte, head_ev, targets_bt, mask_bt, n, softcap)
  return sums, (x_bte, head_ev, targets_bt, mask_bt, logz)


def _bwd(n: int, softcap: float, res: tuple, g: tuple[jax.Array, jax.Array]) -> tuple:
  x_bte, head_ev, targets_bt, mask_bt, logz = res
  g_ce, g_z = g
  cd = x_bte.dtype
  b, t, e = x_bte.shape

  def body(dhead: jax.Array, xs: tuple) -> tuple[jax.Array, jax.Array]:
    x, targets, mask, lz = xs
    chunk_logits = logits(x, head_ev, softcap)
    p = jnp.exp(chunk_logits - lz[..., None])
    # d ce / d logits = p - onehot(target); d logz^2 / d logits = 2 logz p; both masked
    scale = (mask * g_ce)[..., None]
    dlogits = p * (scale + (mask * g_z * 2.0 * lz)[..., None])
    onehot = jax.nn.one_hot(targets, chunk_logits.shape[-1], dtype=jnp.bool_)
    dlogits = dlogits - jnp.where(onehot, scale, 0.0)
    if softcap:  # s = c tanh(x / c): ds/dx = 1 - (s / c)^2
      dlogits = dlogits * (1.0 - jnp.square(chunk_logits / softcap))
    dlogits = dlogits.astype(cd)
    dx = jnp.einsum("bcv,ev->bce", dlogits, head_ev.astype(cd),
                    preferred_element_type=jnp.float32).astype(cd)
    dhead = dhead + jnp.einsum("bce,bcv->ev", x, dlogits, preferred_element_type=jnp.float32)
    return dhead, dx

  dhead, dx = jax.lax.scan(body, jnp.zeros(head_ev.shape, jnp.float32),
                           (_strided(x_bte, n), _strided(targets_bt, n),
                            _strided(mask_bt, n), logz))
  dx_bte = jnp.moveaxis(dx, 0, 2).reshape(b, t, e).astype(x_bte.dtype)
  # A tied head is embed.T: XLA would fold that transpose into a lone chunk's dhead matmul,
  # making a bf16 dot (contracting lhs dim 0) that XLA:CPU cannot run ("DotThunk: BF16 x BF16
  # = F32"); the barrier keeps the matmul as written and the transpose a copy after it.
  dhead = jax.lax.optimization_barrier(dhead)
  return dx_bte, dhead.astype(head_ev.dtype), None, None


chunked.defvjp(_fwd, _bwd)
