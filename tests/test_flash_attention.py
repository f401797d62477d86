"""pallas_kernels.flash_attention, forward and backward (interpret mode on CPU), against the
pure-jnp reference, and the reference against jmid's own XLA attention. Fresh random inputs
each run: the seed is in the failure message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference

SEED = int(np.random.SeedSequence().entropy % 2**31)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(b, t, s, hq, hkv, d, dtype, seed=SEED):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=shape), dtype)
             for shape in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))
  return q, k, v


def _packed(b, t, seed=SEED):
  """Documents of random lengths (boundaries fall inside 16-token blocks), then padding (0)."""
  r = np.random.default_rng(seed + 1)
  rows = []
  for _ in range(b):
    row, doc = [], 1
    while len(row) < t - 6:
      row += [doc] * int(r.integers(3, 23))
      doc += 1
    rows.append((row[: t - 6] + [0] * 6)[:t])
  return jnp.asarray(rows, jnp.int32)


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol, err_msg=f"seed {SEED}: {what}")


def _check(kw, q, k, v, dtype):
  """Outputs, logsumexp and the gradients dq, dk, dv of a random projection of both."""
  o, lse = flash_attention(q, k, v, block_sizes=(16, 16), return_lse=True, **kw)
  ro, rl = attention_reference(q, k, v, return_lse=True, **kw)
  assert not jnp.isnan(o).any() and not jnp.isnan(lse).any()
  tol = TOL[dtype]
  _close(o, ro, tol, f"o {kw}")
  assert np.array_equal(np.isfinite(lse), np.isfinite(rl)), f"seed {SEED}"
  fin = np.isfinite(rl)
  _close(np.asarray(lse)[fin], np.asarray(rl)[fin], tol, f"lse {kw}")
  w = jnp.asarray(np.random.default_rng(SEED + 2).normal(size=o.shape), jnp.float32)

  def loss(fn, **extra):
    return lambda q, k, v: jnp.sum(fn(q, k, v, **kw, **extra).astype(jnp.float32) * w)
  got = jax.grad(loss(flash_attention, block_sizes=(16, 16)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(attention_reference), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip(("dq", "dk", "dv"), got, want):
    assert a.dtype == b.dtype and not jnp.isnan(a).any()
    _close(a, b, 4 * tol, f"{name} {kw}")


CASES = [(1, True, jnp.float32), (2, True, jnp.float32), (4, True, jnp.float32),
         (8, True, jnp.float32), (2, False, jnp.float32), (4, True, jnp.bfloat16),
         (1, False, jnp.bfloat16)]


@pytest.mark.parametrize("group,causal,dtype", CASES,
                         ids=[f"gqa{g}-{'causal' if c else 'full'}-{jnp.dtype(d).name}"
                              for g, c, d in CASES])
def test_matches_reference_packed_gqa(group, causal, dtype):
  q, k, v = _inputs(2, 56, 56, 8, 8 // group, 64, dtype)
  _check(dict(causal=causal, segment_ids=_packed(2, 56)), q, k, v, dtype)


@pytest.mark.parametrize("kw", [dict(window=7), dict(window=20, causal=False),
                                dict(softcap=2.5), dict(scale=0.3)],
                         ids=["window", "window-full", "softcap", "scale"])
def test_windows_softcap_scale(kw):
  q, k, v = _inputs(1, 64, 64, 4, 2, 128, jnp.float32)
  _check(dict(segment_ids=_packed(1, 64), **kw), q, k, v, jnp.float32)


@pytest.mark.parametrize("t,s", [(24, 70), (70, 24), (1, 40)])
def test_t_different_from_s(t, s):
  q, k, v = _inputs(2, t, s, 4, 1, 64, jnp.float32)
  _check(dict(causal=True), q, k, v, jnp.float32)
  segs = (jnp.ones((2, t), jnp.int32), jnp.asarray(np.arange(s)[None].repeat(2, 0) % 3 + 1))
  _check(dict(causal=False, segment_ids=segs), q, k, v, jnp.float32)


def test_fully_masked_rows_are_zero_not_nan():
  q, k, v = _inputs(1, 32, 32, 2, 2, 64, jnp.float32)
  q_seg = jnp.asarray([[5] * 16 + [1] * 16])  # segment 5 has no keys at all
  kv_seg = jnp.asarray([[1] * 32])
  o, lse = flash_attention(q, k, v, segment_ids=(q_seg, kv_seg), block_sizes=(16, 16),
                           return_lse=True)
  assert not jnp.isnan(o).any()
  assert float(jnp.abs(o[0, :16]).max()) == 0.0 and bool(jnp.isneginf(lse[0, :, :16]).all())


def test_reference_agrees_with_jmid_xla_attention():
  """The reference itself, against an independent implementation (jmid.attention)."""
  from jmid.attention import attention
  q, k, v = _inputs(2, 48, 48, 8, 2, 32, jnp.float32)
  seg = _packed(2, 48)
  np.testing.assert_allclose(attention_reference(q, k, v, segment_ids=seg),
                             attention(q, k, v, seg, implementation="xla"), atol=1e-5)
  np.testing.assert_allclose(attention_reference(q, k, v, segment_ids=seg, window=5),
                             attention(q, k, v, seg, implementation="xla", window=5),
                             atol=1e-5)


def test_logsumexp_cotangent_flows():
  """A loss on the logsumexp too (as ring attention combines blocks by it)."""
  q, k, v = _inputs(1, 40, 40, 4, 2, 64, jnp.float32)
  seg = _packed(1, 40)

  def loss(fn, **extra):
    def f(q, k, v):
      o, lse = fn(q, k, v, segment_ids=seg, return_lse=True, **extra)
      return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) ** 2)
    return f
  got = jax.grad(loss(flash_attention, block_sizes=(16, 16)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(attention_reference), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    _close(a, b, 1e-4, "grads through lse")


def test_jmid_model_with_pallas_attention_matches_xla():
  """model.attention='pallas' (interpret mode): the same loss and gradients as 'xla'."""
  import dataclasses

  from jmid import model as model_lib
  from jmid import steps
  from tests.helpers import tiny_config
  from tests.test_sharding import synthetic_batch
  cfg = dataclasses.replace(tiny_config().model, sliding_window=6)
  batch = synthetic_batch(2, 16, cfg.vocab_size, seed=SEED)
  out = {}
  for impl in ("xla", "pallas"):
    c = dataclasses.replace(cfg, attention=impl)
    graphdef, _, _ = model_lib.abstract_model(c)
    params = model_lib.init_params(c, seed=0)
    loss_fn = lambda p: steps.loss_sums(graphdef, p, batch)[0]  # noqa: E731
    out[impl] = jax.value_and_grad(loss_fn)(params)
  (lx, gx), (lp, gp) = out["xla"], out["pallas"]
  assert float(lp) == pytest.approx(float(lx), rel=1e-5)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
