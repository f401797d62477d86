"""Model forward: shapes, causality, packed-document isolation, GQA and remat correctness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmid import attention as attn_lib
from jmid import model as model_lib
from tests.helpers import tiny_config


def _model(**kw):
  cfg = tiny_config(**kw).model
  graphdef, _, _ = model_lib.abstract_model(cfg)
  return cfg, graphdef, model_lib.init_params(cfg, seed=0)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"qkv_bias": True},
                                {"qk_norm": True}, {"n_kv_heads": 4}, {"head_dim": 16}])
def test_forward_shapes_and_finite(kw):
  cfg, graphdef, params = _model(**kw)
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, cfg.vocab_size)
  logits = model_lib.apply(graphdef, params, tokens)
  assert logits.shape == (3, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert ("lm_head" in params) != kw.get("tie_embeddings", False)


def test_causality_by_gradient():
  """d logits[t] / d embedding: with distinct tokens, embedding row j is position j's input."""
  cfg, graphdef, params = _model()
  t = 10
  tokens = jax.random.permutation(jax.random.key(2), cfg.vocab_size)[:t][None]
  for pos in (0, 4, t - 1):
    g = jax.grad(lambda e: model_lib.apply(graphdef, {**params, "embed": e}, tokens)[0, pos]
                 .sum())(params["embed"])
    influence = np.abs(np.asarray(g)[np.asarray(tokens[0])]).sum(-1)
    assert np.all(influence[pos + 1:] == 0), (pos, influence)
    assert np.all(influence[: pos + 1] > 0), (pos, influence)


def test_causality_by_token_change():
  cfg, graphdef, params = _model()
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.vocab_size)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % cfg.vocab_size)
  a = model_lib.apply(graphdef, params, tokens)
  b = model_lib.apply(graphdef, params, changed)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
  assert float(jnp.abs(a[:, 9:] - b[:, 9:]).max()) > 1e-4


def test_packed_document_matches_alone():
  cfg, graphdef, params = _model()
  doc_a = jax.random.randint(jax.random.key(4), (7,), 0, cfg.vocab_size)
  doc_b = jax.random.randint(jax.random.key(5), (6,), 0, cfg.vocab_size)
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros(3, jnp.int32)])[None]
  segs = jnp.array([[1] * 7 + [2] * 6 + [0] * 3])
  pos = jnp.array([list(range(7)) + list(range(6)) + [0, 0, 0]])
  out = model_lib.apply(graphdef, params, packed, pos, segs)
  alone_a = model_lib.apply(graphdef, params, doc_a[None])
  alone_b = model_lib.apply(graphdef, params, doc_b[None])
  np.testing.assert_allclose(out[0, :7], alone_a[0], atol=2e-5)
  np.testing.assert_allclose(out[0, 7:13], alone_b[0], atol=2e-5)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_gqa_attention_matches_repeated_heads_reference():
  kq, kk, kv = jax.random.split(jax.random.key(6), 3)
  q = jax.random.normal(kq, (2, 9, 8, 16))
  k = jax.random.normal(kk, (2, 9, 2, 16))
  v = jax.random.normal(kv, (2, 9, 2, 16))
  segs = jnp.array([[1] * 5 + [2] * 4, [1] * 9])
  out = attn_lib.attention(q, k, v, segs)
  # independent reference: repeat K/V per group, plain softmax with an explicit loop mask
  kr, vr = jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, kr) / 4.0
  mask = np.zeros((2, 9, 9), bool)
  for b in range(2):
    for i in range(9):
      for j in range(i + 1):
        mask[b, i, j] = int(segs[b, i]) == int(segs[b, j])
  s = jnp.where(mask[:, None], s, -jnp.inf)
  ref = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), vr)
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "save:qkv,attn,mlp_out"])
def test_remat_same_values_and_grads(remat):
  cfg, graphdef, params = _model()
  cfg_r, graphdef_r, _ = _model(remat=remat)
  tokens = jax.random.randint(jax.random.key(7), (2, 8), 0, cfg.vocab_size)
  f = lambda g: (lambda p: model_lib.apply(g, p, tokens).sum())
  v0, g0 = jax.value_and_grad(f(graphdef))(params)
  v1, g1 = jax.value_and_grad(f(graphdef_r))(params)
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)


def test_bfloat16_compute_runs_with_float32_logits():
  cfg, graphdef, params = _model(compute_dtype="bfloat16")
  tokens = jnp.zeros((1, 8), jnp.int32)
  logits = model_lib.apply(graphdef, params, tokens)
  assert logits.dtype == jnp.float32 and params["embed"].dtype == jnp.float32
