"""The train step learns, and gradient accumulation equals one big batch."""


import jax
import numpy as np

from jmid import config as config_lib
from jmid import build, sharding
from tests.helpers import tiny_configdict
from tests.helpers import synthetic_batch


def _run(microbatches: int, steps: int, same_batch: bool) -> list[float]:
  c = tiny_configdict()
  c.mesh.fsdp = 1
  c.train.microbatches = microbatches
  c.optim.lr = 1e-2
  cfg = config_lib.from_configdict(c)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  su = build.setup(cfg, mesh)
  with jax.set_mesh(mesh):
    state = su.create_state()
    losses = []
    for i in range(steps):
      b = synthetic_batch(8, 16, 64, seed=0 if same_batch else i)
      state, m = su.train_step(state, sharding.to_global(b, su.batch_sh))
      losses.append(float(m["loss"]))
  return losses


def test_loss_falls_in_a_few_steps():
  losses = _run(1, 8, same_batch=True)
  assert losses[-1] < 0.7 * losses[0], losses


def test_microbatch_accumulation_equals_full_batch():
  full = _run(1, 3, same_batch=False)
  accum = _run(4, 3, same_batch=False)
  np.testing.assert_allclose(accum, full, rtol=1e-5)


def test_ema_follows_the_params_with_its_decay():
  c = tiny_configdict()
  c.mesh.fsdp = 1
  c.optim.lr = 1e-2
  c.train.ema_decay = 0.75
  cfg = config_lib.from_configdict(c)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  su = build.setup(cfg, mesh)
  with jax.set_mesh(mesh):
    state = su.create_state()
    p0 = jax.tree.map(np.asarray, state["params"])
    np.testing.assert_array_equal(jax.tree.leaves(state["ema"])[0], jax.tree.leaves(p0)[0])
    for i in range(2):
      state, _ = su.train_step(state, sharding.to_global(synthetic_batch(8, 16, 64, seed=i),
                                                      su.batch_sh))
      if i == 0:
        p1 = jax.tree.map(np.asarray, state["params"])
  p2 = jax.tree.map(np.asarray, state["params"])
  want = jax.tree.map(lambda a, b, c: 0.75 * (0.75 * a + 0.25 * b) + 0.25 * c, p0, p1, p2)
  for got, exp, new in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(want),
                           jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-6, atol=1e-7)
  assert not np.allclose(np.asarray(jax.tree.leaves(state["ema"])[-1]), jax.tree.leaves(p2)[-1])
