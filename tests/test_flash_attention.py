"""pallas_kernels.flash_attention forward (interpret mode on CPU) against the pure-jnp reference,
and the reference against jmid's own XLA attention. Fresh random inputs each run: the seed is in
the failure message."""

import numpy as np
import pytest
import jax.numpy as jnp

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


def _check(kw, q, k, v, dtype):
  o, lse = flash_attention(q, k, v, block_sizes=(16, 16), return_lse=True, **kw)
  ro, rl = attention_reference(q, k, v, return_lse=True, **kw)
  assert not jnp.isnan(o).any() and not jnp.isnan(lse).any()
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ro, np.float32), atol=tol,
                             rtol=tol, err_msg=f"seed {SEED}, {kw}")
  assert np.array_equal(np.isfinite(lse), np.isfinite(rl)), f"seed {SEED}"
  fin = np.isfinite(rl)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(rl)[fin], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_forward_matches_reference_packed_gqa(group, causal, dtype):
  q, k, v = _inputs(2, 72, 72, 8, 8 // group, 64, dtype)
  _check(dict(causal=causal, segment_ids=_packed(2, 72)), q, k, v, dtype)


@pytest.mark.parametrize("kw", [dict(window=7), dict(window=20, causal=False),
                                dict(softcap=2.5), dict(scale=0.3)],
                         ids=["window", "window-full", "softcap", "scale"])
def test_forward_windows_softcap_scale(kw):
  q, k, v = _inputs(1, 64, 64, 4, 2, 128, jnp.float32)
  _check(dict(segment_ids=_packed(1, 64), **kw), q, k, v, jnp.float32)


@pytest.mark.parametrize("t,s", [(24, 70), (70, 24), (1, 40)])
def test_forward_t_different_from_s(t, s):
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
