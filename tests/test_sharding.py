"""Meshes: same loss on any factorisation (hybrid node meshes too), shardings follow the rules,
FSDP really shards."""


import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jmid import config as config_lib
from jmid.errors import ConfigError
from jmid import build, sharding
from tests.helpers import synthetic_batch, tiny_configdict


def _config(data: int, fsdp: int, tensor: int, attention: str = "xla",
            **train_kw) -> config_lib.Config:
  c = tiny_configdict()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.model.d_model, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 64, 4, 2, 128
  c.model.attention = attention
  for k, v in train_kw.items():
    setattr(c.train, k, v)
  return config_lib.from_configdict(c)


def _losses(c: config_lib.Config, devices, n_steps: int = 3,
            granule_of=sharding.granule) -> list[float]:
  mesh = sharding.make_mesh(c.mesh, devices, granule_of)
  su = build.setup(c, mesh)
  with jax.set_mesh(mesh):
    state = su.create_state()
    out = []
    for i in range(n_steps):
      batch = sharding.to_global(synthetic_batch(c.train.global_batch, c.data.seq_len,
                                              c.model.vocab_size, seed=i), su.batch_sh)
      state, m = su.train_step(state, batch)
      out.append(float(m["loss"]))
  return out


@functools.cache
def _one_device() -> list[float]:
  return _losses(_config(1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_every_factorisation_matches_one_device(shape):
  one = _one_device()
  many = _losses(_config(*shape), jax.devices())
  np.testing.assert_allclose(many, one, rtol=2e-5)
  assert one[-1] < one[0]  # and it actually trains


def test_pallas_attention_under_a_mesh_matches_xla_on_one_device():
  """The kernel runs per device in shard_map: rows over data*fsdp, heads over tensor."""
  one = _one_device()
  many = _losses(_config(2, 2, 2, attention="pallas"), jax.devices())
  np.testing.assert_allclose(many, one, rtol=2e-5)


def test_parameters_carry_the_rule_shardings():
  c = _config(1, 4, 2)
  mesh = sharding.make_mesh(c.mesh, jax.devices())
  su = build.setup(c, mesh)
  with jax.set_mesh(mesh):
    state = su.create_state()
  p = state["params"]
  assert p["embed"].sharding.spec == P("tensor", "fsdp")
  assert p["lm_head"].sharding.spec == P("fsdp", "tensor")
  assert p["blocks"]["attn"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert p["blocks"]["attn"]["wk"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert p["blocks"]["attn"]["wo"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert p["blocks"]["mlp"]["w_gate"].sharding.spec == P(None, "fsdp", "tensor")
  assert p["blocks"]["mlp"]["w_down"].sharding.spec == P(None, "tensor", "fsdp")
  assert p["final_norm"]["scale"].sharding.spec == P("fsdp")
  # Adam moments follow their parameters; the step counter is replicated
  mu = state["opt_state"][1][0].mu
  assert mu["blocks"]["attn"]["wq"].sharding.spec == p["blocks"]["attn"]["wq"].sharding.spec
  assert state["step"].sharding.spec == P()


def test_fsdp8_stores_an_eighth_per_device():
  c = _config(1, 8, 1)
  mesh = sharding.make_mesh(c.mesh, jax.devices())
  su = build.setup(c, mesh)
  with jax.set_mesh(mesh):
    params = su.create_state()["params"]
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  per_device = sharding.bytes_per_device(params)
  assert len(per_device) == 8
  for nbytes in per_device.values():
    assert nbytes == pytest.approx(total / 8, rel=0.02)


def test_dimension_not_divisible_is_replicated_not_an_error():
  spec = sharding.logical_spec(("vocab", "embed"), (66, 64), {"tensor": 4, "fsdp": 2})
  assert spec == P(None, "fsdp")


def test_mesh_size_mismatch_is_a_config_error():
  with pytest.raises(ConfigError, match="mesh"):
    sharding.mesh_shape(config_lib.MeshConfig(data=3, fsdp=1, tensor=1, context=1), 8)
  assert sharding.mesh_shape(config_lib.MeshConfig(2, -1, 2, 1), 8) == (2, 2, 2, 1)


def _nodes_of_4(d: jax.Device) -> int:
  """Stands in for 2 nodes (or slices) of 4 devices: what a node is, on one CPU process."""
  return d.id // 4


def test_a_hybrid_mesh_keeps_each_node_in_one_block_and_trains_the_same():
  ids = lambda m: np.vectorize(lambda d: d.id)(m.devices)  # noqa: E731
  mesh = sharding.make_mesh(config_lib.MeshConfig(1, -1, 1, 1), jax.devices(), _nodes_of_4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "context": 1}  # dcn_data=0: all
  assert ids(mesh)[:, :, 0, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # data crosses nodes
  c = config_lib.MeshConfig(2, 2, 1, 1, dcn_data=1, dcn_fsdp=2)
  mesh = sharding.make_mesh(c, jax.devices(), _nodes_of_4)
  assert dict(mesh.shape)["fsdp"] == 4
  assert ids(mesh)[:, :, 0, 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]  # fsdp crosses nodes
  flat = sharding.make_mesh(config_lib.MeshConfig(1, -1, 1, 1, dcn_data=1), jax.devices(),
                            _nodes_of_4)
  assert dict(flat.shape)["fsdp"] == 8  # dcn_data=1 with dcn_fsdp=1: one flat mesh
  alone = sharding.make_mesh(config_lib.MeshConfig(1, -1, 1, 1), jax.devices(), lambda d: d.id)
  assert dict(alone.shape)["fsdp"] == 8  # one device per process: nothing says where nodes are
  # the same training on any of them (fsdp across nodes reorders the rows of the batch)
  one = _one_device()
  cfg = _config(2, 2, 1)
  hybrid = dataclasses.replace(cfg, mesh=c)
  np.testing.assert_allclose(_losses(hybrid, jax.devices(), granule_of=_nodes_of_4), one,
                             rtol=2e-5)


@pytest.mark.parametrize("mesh,match", [
    (config_lib.MeshConfig(1, 8, 1, 1), "of one node/slice"),  # fsdp=8 inside a node of 4
    (config_lib.MeshConfig(1, -1, 1, 1, dcn_data=3), "has 2 nodes"),
    (config_lib.MeshConfig(1, -1, 1, 1, dcn_fsdp=4), "does not divide the 2"),
])
def test_hybrid_sizes_that_do_not_match_the_nodes_are_one_config_error(mesh, match):
  with pytest.raises(ConfigError, match=match):
    sharding.make_mesh(mesh, jax.devices(), _nodes_of_4)
