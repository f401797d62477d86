"""The chunked LM head + cross-entropy (jmid/loss.py) equals the plain one, in value and
gradient, alone and inside a sharded train step; and it never holds [tokens, vocab] in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmid import build, loss, sharding
from jmid import config as config_lib
from jmid.plan import compile_train_step
from tests.helpers import synthetic_batch, tiny_configdict


def _objective(fn, x, head, targets, mask, tied):
  ce, z = fn(x, head.T if tied else head, targets, mask)  # tied: the embedding [v, e]
  return ce + 0.3 * z  # z-loss kept: its gradient path is the chunked backward's too


@pytest.mark.parametrize("dtype,tied,cap", [(jnp.float32, False, 0.0), (jnp.bfloat16, False, 0.0),
                                            (jnp.bfloat16, True, 0.0), (jnp.float32, True, 2.0)])
def test_chunked_equals_plain_in_value_and_gradient(dtype, tied, cap):
  """Masked tokens, z-loss, chunks of 1 position to the whole row, compiled: the same sums and
  the same gradients for the hidden states and the head (bf16: the matmuls in bf16 with f32
  accumulation on both sides, so they agree to bf16 rounding). A tied head (embed.T) in one
  chunk once compiled to a bf16 matmul XLA:CPU cannot run. cap: Gemma 2's final softcap,
  whose derivative the chunked backward applies by hand."""
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  b, t, e, v = 2, 24, 16, 97
  x = jax.random.normal(k[0], (b, t, e)).astype(dtype)
  head = jax.random.normal(k[1], (v, e) if tied else (e, v)) * 0.3
  targets = jax.random.randint(k[2], (b, t), 0, v)
  mask = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.float32)

  def value_and_grad(fn):
    return jax.jit(jax.value_and_grad(lambda x, h: _objective(fn, x, h, targets, mask, tied),
                                      argnums=(0, 1)))(x, head)
  want = value_and_grad(lambda *a: loss.plain(*a, softcap=cap))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for n in (1, 3, t):
    got = value_and_grad(lambda *a, n=n: loss.chunked(*a, n, cap))
    np.testing.assert_allclose(got[0], want[0], rtol=tol)
    for g, w in zip(got[1], want[1]):
      assert g.dtype == w.dtype
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 rtol=tol, atol=tol * float(jnp.max(jnp.abs(w))))


def test_chunk_counts_keep_one_shape_and_the_context_split():
  assert loss.n_chunks(4096, 1024) == 4 and loss.n_chunks(100, 30) == 2
  assert loss.n_chunks(16, 1, context=4) == 4  # 16/4 = 4 positions per chunk, 1 per device
  assert loss.n_chunks(16, 1000) == 1


def _steps(loss_chunk: int, mesh_sizes: dict) -> tuple[list, dict]:
  c = tiny_configdict()
  c.train.loss_chunk = loss_chunk
  c.optim.z_loss = 1e-2
  for k, v in mesh_sizes.items():
    setattr(c.mesh, k, v)
  cfg = config_lib.from_configdict(c)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices())
  su = build.setup(cfg, mesh)
  with jax.set_mesh(mesh):
    state = su.create_state()
    got = []
    for i in range(2):
      batch = synthetic_batch(8, 16, 64, seed=i)
      batch["loss_mask"][:, :3] = 0
      state, m = su.train_step(state, sharding.to_global(batch, su.batch_sh))
      got.append({k: float(m[k]) for k in ("loss", "z_loss", "grad_norm")})
    return got, jax.device_get(state["params"])


@pytest.mark.slow  # about 45 s: the fast lane keeps under 20 minutes
def test_a_sharded_train_step_with_chunks_equals_the_plain_one():
  """data x fsdp x context over the 8 devices, 4 chunks of 4 positions (2 on each device of
  the context axis): the same losses, gradient norms and params after 2 steps."""
  mesh = {"data": 2, "fsdp": 2, "context": 2, "context_layout": "zigzag"}
  c = tiny_configdict()
  c.train.loss_chunk = 4
  for k, v in mesh.items():
    setattr(c.mesh, k, v)
  cfg = config_lib.from_configdict(c)  # 2 rows per device, 4 tokens per device per chunk
  assert build.loss_chunks(cfg, sharding.make_mesh(cfg.mesh, jax.devices()), 8) == 4
  plain, p_plain = _steps(0, mesh)
  chunked, p_chunked = _steps(4, mesh)
  for a, b in zip(chunked, plain):
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-5), (k, a, b)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               p_chunked, p_plain)


def _temp_bytes(vocab: int, loss_chunk: int) -> int:
  c = tiny_configdict()
  c.model.vocab_size, c.model.d_model, c.model.n_layers = vocab, 64, 1
  c.data.seq_len, c.train.global_batch, c.mesh.fsdp = 4096, 1, 1
  c.train.loss_chunk = loss_chunk
  cfg = config_lib.from_configdict(c)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  su = build.setup(cfg, mesh)
  return compile_train_step(cfg, su.train_step, su.abstract_state,
                            su.batch_sh).memory_analysis().temp_size_in_bytes


def test_a_qwen_vocab_costs_less_than_one_float32_logits_array():
  """Compiled, not run: at vocab 151,936 and 4096 tokens the step's temporaries grow over a
  vocab-512 twin by less than one float32 [tokens, vocab] array with the chunked loss; the
  plain loss holds several (logits, softmax, their gradient)."""
  one = 4096 * 151936 * 4
  chunked = _temp_bytes(151936, 1024) - _temp_bytes(512, 1024)
  plain = _temp_bytes(151936, 0) - _temp_bytes(512, 0)
  assert chunked < one < plain, (chunked / one, plain / one)
