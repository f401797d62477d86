"""pallas_kernels.flash_attention, forward and backward, against the pure-jnp reference: both
kernel families (GPU and TPU) in interpret mode, their block skipping, their lowering for
"cuda" and "tpu" with jax.export, and the reference against jmid's own XLA attention. Fresh
random inputs each run: the seed is in the failure message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import blocks
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference, split_segments, visible

SEED = int(np.random.SeedSequence().entropy % 2**31)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# the kernel families, interpreted, with small blocks so that every case spans several
FAMILIES = {"gpu": dict(block_sizes=(16, 16)),
            "tpu": dict(platform="tpu", interpret=True, block_sizes=(16, 128))}


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


def _check(kw, q, k, v, dtype, family="gpu"):
  """Outputs, logsumexp and the gradients dq, dk, dv of a random projection of both."""
  o, lse = flash_attention(q, k, v, return_lse=True, **FAMILIES[family], **kw)
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
  got = jax.grad(loss(flash_attention, **FAMILIES[family]), argnums=(0, 1, 2))(q, k, v)
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
  """model.attention='pallas' (interpret mode): the same loss and gradients as 'xla', for a
  Gemma 2 shaped model: a local then a global layer (the window reaches the kernel's block
  skipping on one layer only), attention and final softcaps, its own query scale."""
  import dataclasses

  from jmid import model as model_lib
  from jmid import steps
  from tests.helpers import tiny_config
  from tests.helpers import synthetic_batch
  cfg = dataclasses.replace(tiny_config().model, sliding_window=6, layer_pattern="LG",
                            attn_softcap=3.0, final_softcap=5.0, query_scale=24.0,
                            norm_style="gemma", norm_placement="pre_post",
                            mlp_activation="gelu_tanh", embed_scale=True)
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


TPU_CASES = [dict(group=1, causal=True), dict(group=4, causal=False),
             dict(group=2, causal=True, window=40), dict(group=2, causal=True, softcap=3.0),
             dict(group=2, causal=True, dtype=jnp.bfloat16)]


@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: "-".join(
    f"{k}{getattr(v, '__name__', v)}" for k, v in c.items()))
def test_tpu_family_matches_reference(case):
  """The Mosaic TPU kernels (4-D grid, scratch accumulators, SMEM block mask), interpreted:
  272 tokens are 17 query blocks and 3 key blocks, packed, with padding in the last block."""
  case = dict(case)
  group, dtype = case.pop("group"), case.pop("dtype", jnp.float32)
  q, k, v = _inputs(1, 272, 272, 4, 4 // group, 64, dtype)
  _check(dict(segment_ids=_packed(1, 272), **case), q, k, v, dtype, family="tpu")


def test_tpu_family_t_different_from_s_and_head_dim_256():
  q, k, v = _inputs(1, 40, 300, 2, 1, 256, jnp.float32)
  _check(dict(causal=True), q, k, v, jnp.float32, family="tpu")
  q, k, v = _inputs(1, 300, 40, 2, 2, 128, jnp.float32)
  _check(dict(causal=False), q, k, v, jnp.float32, family="tpu")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_masked_blocks_are_not_computed(family):
  """NaN in key block 2 reaches exactly the query blocks that visit it: a masked block that
  were computed would spread the NaN (0 * NaN) even though no element is visible."""
  bq, bk = FAMILIES[family]["block_sizes"]
  t = 5 * bk
  q, k, v = _inputs(1, t, t, 2, 2, 64, jnp.float32)
  v = v.at[:, 2 * bk:3 * bk].set(jnp.nan)
  run = lambda **kw: np.isfinite(np.asarray(flash_attention(q, k, v, **FAMILIES[family], **kw)))
  finite = run(causal=True).all(axis=(2, 3))[0]
  assert finite[:2 * bk].all() and not finite[2 * bk:].any()  # causality skips the future
  seg = jnp.asarray([[1] * bq + [2] * (t - bq)])
  finite = run(causal=False, segment_ids=seg).all(axis=(2, 3))[0]
  assert finite[:bq].all() and not finite[bq:].any()  # another document's block is skipped
  finite = run(causal=True, window=bk // 2).all(axis=(2, 3))[0]
  assert not finite[2 * bk:3 * bk + bk // 2 - 1].any()
  assert finite[:2 * bk].all() and finite[t - bq:].all()  # so is one behind the window


def test_block_mask_never_skips_a_visible_pair():
  """blocks.block_mask against the dense mask: never less; exact for causality and the window
  alone, and for packed (sorted) segment ids alone."""
  r = np.random.default_rng(SEED)
  t, s, bq, bk = 96, 128, 16, 32
  none = (jnp.zeros((2, t), jnp.int32), jnp.zeros((2, s), jnp.int32))
  packed = (jnp.asarray(np.sort(r.integers(1, 6, (2, t)))),
            jnp.asarray(np.sort(r.integers(1, 6, (2, s)))))
  shuffled = (jnp.asarray(r.integers(1, 4, (2, t))), jnp.asarray(r.integers(1, 4, (2, s))))
  for segs in (none, packed, shuffled):
    for causal, window in ((True, None), (False, None), (True, 20), (False, 50)):
      cfg = blocks.Cfg(scale=1.0, causal=causal, window=window, softcap=None, offset=s - t,
                       group=1, block_sizes=None, interpret=True, platform=None)
      got = np.asarray(blocks.block_mask(cfg, *segs, bq, bk)).astype(bool)
      dense = np.asarray(visible(*split_segments(segs, 2, t, s), causal, window))
      want = dense.reshape(2, t // bq, bq, s // bk, bk).any(axis=(2, 4))
      assert (got >= want).all(), f"seed {SEED}: a visible block is skipped"
      exact = segs is none or (segs is packed and not causal and not window)
      assert not exact or (got == want).all(), f"seed {SEED}: {causal=} {window=}"


def _export(platform, fn, *args):
  """jax.export for `platform` on this CPU host; Triton needs an abstract GPU from jax 0.12."""
  gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                    platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=gpu)
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  with jax.sharding.use_abstract_mesh(mesh if platform == "cuda" else
                                      jax.sharding.get_abstract_mesh()):
    return jax.export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=[triton])(*args).mlir_module()


@pytest.mark.parametrize("platform,call", [("cuda", "@__gpu$xla.gpu.triton"),
                                           ("tpu", "@tpu_custom_call")])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_forward_and_backward_lower_to_the_kernels(platform, call, d):
  """The dispatch follows the platform being lowered for: the module holds our kernels (one
  forward; forward, dq and dk/dv for the gradient), named, and no other custom call."""
  q = jax.ShapeDtypeStruct((2, 1024, 8, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1024, 2, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  fwd = lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s, window=300)
  grad = jax.grad(lambda q, k, v, s: fwd(q, k, v, s).astype(jnp.float32).sum(),
                  argnums=(0, 1, 2))
  for fn, kernels in ((fwd, ["fwd"]), (grad, ["fwd", "dq", "dkv"])):
    text = _export(platform, fn, q, kv, kv, seg)
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == len(kernels) and all(call in c for c in calls), calls
    for name in kernels:
      assert f"jmid_flash_attention_{name}" in text
