"""Ring attention on 4 and 8 fake CPU devices equals unsplit attention (pallas_kernels'
reference): outputs and gradients, causal and not, packed documents whose boundaries fall inside
chunks, GQA, a sliding window, both layouts, the jnp blocks and the Pallas kernels interpreted.
Then the model: train steps on a mesh with a context axis (with fsdp, tensor, either layout)
equal those on one device, and the compiled step's activations split over the axis.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jmid import config as config_lib
from jmid import build, plan, ring, sharding
from pallas_kernels import reference
from pallas_kernels.blocks import Cfg
from tests.helpers import synthetic_batch, tiny_configdict


def packed_segments(b: int, t: int, seed: int) -> np.ndarray:
  """Rows of documents of random lengths (ids rising from 1), boundaries anywhere."""
  rng = np.random.default_rng(seed)
  out = np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), size=4, replace=False))
    out[r] = 1 + np.searchsorted(cuts, np.arange(t), side="right")
  return out


def inputs(b=2, t=64, hq=4, hkv=2, d=16, packed=True, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32)
  seg = jnp.asarray(packed_segments(b, t, seed) if packed else np.ones((b, t), np.int32))
  w = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32)  # a loss that weighs every output
  return q, k, v, seg, w


def ring_vs_reference(n, layout, causal, window=0, implementation="xla", **shape):
  q, k, v, seg, w = inputs(**shape)
  t = q.shape[1]
  perm = ring.permutation(layout, n, t)
  inv = np.argsort(perm)
  mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
  spec = P(None, "context")
  attend = functools.partial(ring.ring_attention, axis="context", n=n, layout=layout,
                             causal=causal, window=window, implementation=implementation,
                             interpret=implementation == "pallas")
  sharded = jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec,
                          check_vma=False)

  def ring_loss(q, k, v):  # in the row's own order: the layout is undone around the ring
    o = sharded(q[:, perm], k[:, perm], v[:, perm], seg[:, perm])[:, inv]
    return jnp.sum(o * w), o

  def ref_loss(q, k, v):
    o = reference.attention_reference(q, k, v, segment_ids=seg, causal=causal,
                                      window=window or None)
    return jnp.sum(o * w), o

  (_, o), g = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  (_, o_ref), g_ref = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
  for name, x, y in zip("qkv", g, g_ref):
    np.testing.assert_allclose(x, y, atol=2e-4, rtol=2e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("layout,causal,packed", [
    ("zigzag", True, True), ("contiguous", True, True), ("zigzag", False, True),
    ("contiguous", False, False)])
def test_ring_equals_unsplit_attention_on_4_devices(layout, causal, packed):
  ring_vs_reference(4, layout, causal, packed=packed)


def test_ring_with_a_sliding_window_on_8_devices():
  # chunks of 4 tokens and a window of 11: pairs fully, partly and not at all in reach
  ring_vs_reference(8, "zigzag", True, window=11)


@pytest.mark.parametrize("layout,window", [("zigzag", 0), ("contiguous", 9)])
def test_ring_with_the_pallas_kernels(layout, window):
  ring_vs_reference(4, layout, True, window=window, implementation="pallas", b=1, hq=2, hkv=1)


def test_pairs_out_of_reach_are_skipped():
  """Causal: a future chunk compiles to no call at all; with a window, nor does a chunk
  wholly beyond it. Without either, every pair is the same full call."""
  block = Cfg(scale=1.0, causal=True, window=None, softcap=None, offset=0, group=1,
              block_sizes=None, interpret=True, platform=None)
  calls, table = ring.pair_cfgs(block, m=8, c=4)
  assert calls[table[0]] is None and calls[table[6]] is None  # distances -7 and -1
  assert calls[table[7]].causal and calls[table[7]].offset == 0  # the diagonal
  assert len(calls) == 3 and not calls[table[8]].causal  # every earlier chunk: one full call
  calls, table = ring.pair_cfgs(dataclasses.replace(block, window=6), m=8, c=4)
  assert [None if calls[i] is None else calls[i].offset for i in table[7:]] == \
         [0, 4, 8, None, None, None, None, None]
  calls, _ = ring.pair_cfgs(dataclasses.replace(block, causal=False), m=8, c=4)
  assert len(calls) == 1


def test_layouts_and_bad_splits():
  assert ring.permutation("zigzag", 2, 8).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
  assert ring.permutation("contiguous", 2, 8).tolist() == list(range(8))
  with pytest.raises(ValueError, match="does not split into 4 equal chunks"):
    ring.permutation("zigzag", 2, 10)


# The model over a mesh with a context axis ---------------------------------------------------

def _context_config(context: int, fsdp: int = 1, layout: str = "zigzag", attention: str = "xla",
                    seq_len: int = 32, **model):
  c = tiny_configdict(attention=attention, **model)
  c.mesh.data, c.mesh.fsdp, c.mesh.context = 1, fsdp, context
  c.mesh.context_layout = layout
  c.data.seq_len = seq_len
  c.train.global_batch = 4
  return config_lib.from_configdict(c)


def _train(c, n_steps=3):
  """(losses, grad norms, final params as numpy) of n_steps train steps on fixed batches."""
  devices = jax.devices()[:c.mesh.data * c.mesh.fsdp * c.mesh.tensor * c.mesh.context]
  mesh = sharding.make_mesh(c.mesh, devices)
  su = build.setup(c, mesh)
  with jax.set_mesh(mesh):
    state = su.create_state()
    losses, norms = [], []
    for i in range(n_steps):
      batch = sharding.to_global(synthetic_batch(c.train.global_batch, c.data.seq_len,
                                                 c.model.vocab_size, seed=i), su.batch_sh)
      state, m = su.train_step(state, batch)
      losses.append(float(m["loss"]))
      norms.append(float(m["grad_norm"]))
    return losses, norms, jax.tree.map(np.asarray, state["params"])


def _same_training(a, b, rtol=2e-5):
  np.testing.assert_allclose(a[0], b[0], rtol=rtol)  # losses
  np.testing.assert_allclose(a[1], b[1], rtol=rtol * 10)  # gradient norms
  for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2])):  # params after the updates
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_a_model_on_a_context_axis_trains_as_on_one_device(layout):
  one = _train(_context_config(1))
  _same_training(_train(_context_config(4, 2, layout)), one)
  assert one[0][-1] < one[0][0]  # and it trains


@pytest.mark.slow  # about 45 s: the fast lane keeps under 20 minutes
def test_context_with_gqa_heads_over_tensor_a_window_and_remat():
  c = tiny_configdict(n_heads=4, n_kv_heads=2, sliding_window=5, remat="full")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context = 1, 1, 2, 4
  c.data.seq_len, c.train.global_batch = 32, 4
  many = config_lib.from_configdict(c)
  c.mesh.tensor, c.mesh.context = 1, 1
  _same_training(_train(many), _train(config_lib.from_configdict(c)))


@pytest.mark.slow
def test_context_with_the_pallas_kernels():
  one = _train(_context_config(1, seq_len=64), n_steps=2)
  _same_training(_train(_context_config(2, attention="pallas", seq_len=64), n_steps=2), one)


@pytest.mark.slow
def test_context_splits_the_activation_memory():
  """Per-device temporaries of the compiled step at one global length: context=4 holds about a
  quarter of what context=1 does (params are small here, so activations dominate). Both use the
  flash kernels: attention through XLA would hold [T, T] logits, quadratic, not linear."""
  def temp_bytes(context):
    c = _context_config(context, seq_len=2048, d_model=64, d_ff=128, vocab_size=256,
                        attention="pallas")
    devices = jax.devices()[:context]
    mesh = sharding.make_mesh(c.mesh, devices)
    su = build.setup(c, mesh)  # compiled as train compiles it: no mesh set around it
    compiled = plan.compile_train_step(c, su.train_step, su.abstract_state, su.batch_sh)
    return compiled.memory_analysis().temp_size_in_bytes
  one, four = temp_bytes(1), temp_bytes(4)
  assert 0.15 < four / one < 0.4, (one, four)


def test_the_step_train_compiles_runs_the_ring():
  """train compiles its step ahead of time (plan.compile_train_step), outside any mesh
  context: traced without the mesh, mesh.context=2 would silently be attention on gathered K/V,
  with no ring (and no per-device Pallas call, which Mosaic refuses outright on TPU)."""
  c = _context_config(2)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:2])
  su = build.setup(c, mesh)
  hlo = plan.compile_train_step(c, su.train_step, su.abstract_state, su.batch_sh).as_text()
  assert "collective-permute" in hlo  # K/V passed around the ring
