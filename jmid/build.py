"""The train step every entry point builds for a config on a mesh: the abstract model, its
shardings, the optimizer, and the jitted create / train / eval functions, nothing allocated.

train runs it, plan compiles it for a target before anything is rented, tests and benchmarks
drive it directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jmid import checkpoint as ckpt_lib
from jmid import config as config_lib
from jmid import loss as loss_lib
from jmid import model as model_lib
from jmid import attention, optim, sharding, steps
from jmid.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything jitted and sharded for one config on one mesh (shared by train and tests)."""

  graphdef: Any
  param_names: Any  # logical axis names per param leaf
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  param_sh: Any
  state_sh: Any
  batch_sh: jax.sharding.NamedSharding
  abstract_state: Any  # ShapeDtypeStructs carrying state_sh
  create_state: Any  # () -> state, random init created directly sharded
  state_from_params: Any  # params -> state at step 0 with a fresh optimizer
  train_step: Any  # (state, batch) -> (state, metrics), state donated
  eval_step: Any  # (params, batch) -> {ce_sum, count}
  mesh: jax.sharding.Mesh
  attention: str  # model.attention as it runs ('auto' chosen for the mesh's devices)


def attention_for(c: config_lib.Config, mesh: jax.sharding.Mesh) -> str:
  """The attention this config runs on this mesh: model.attention, or what 'auto' picks for
  its devices (config.AUTO_ATTENTION)."""
  return attention.choose(c.model, mesh.devices.flat[0], int(mesh.shape["context"]))


def resolved(c: config_lib.Config, mesh: jax.sharding.Mesh) -> config_lib.Config:
  """The config with model.attention as it runs on this mesh ('auto' chosen)."""
  return dataclasses.replace(c, model=dataclasses.replace(c.model,
                                                          attention=attention_for(c, mesh)))


def setup(c: config_lib.Config, mesh: jax.sharding.Mesh) -> Setup:
  """Abstract model -> logical shardings -> jitted create / train / eval with explicit shardings
  (model.attention='auto' chosen for the mesh's devices)."""
  c = resolved(c, mesh)
  graphdef, abstract_params, names = model_lib.abstract_model(c.model)
  param_sh = sharding.tree_shardings(mesh, names, abstract_params)
  tx = optim.make_optimizer(c.optim, c.train.steps, model_lib.decay_kinds(c.model))
  lr_fn = optim.schedule(c.optim, c.train.steps)
  ema = c.train.ema_decay > 0
  abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx, ema), abstract_params)
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"],
                                            param_sh, transform_non_params=lambda _: rep)
  state_sh = {"step": rep, "params": param_sh, "opt_state": opt_sh}
  if ema:
    state_sh["ema"] = param_sh
  batch_sh = sharding.batch_sharding(mesh)
  create = jax.jit(lambda: steps.init_state(model_lib.init_params(c.model, c.run.seed), tx, ema),
                   out_shardings=state_sh)
  from_params = jax.jit(lambda p: steps.init_state(p, tx, ema), in_shardings=(param_sh,),
                        out_shardings=state_sh)
  train_step = jax.jit(
      steps.make_train_step(graphdef, tx, lr_fn, c.train.microbatches, c.optim.z_loss,
                            c.train.ema_decay, c.mesh.context_layout,
                            loss_chunks(c, mesh, c.train.global_batch // c.train.microbatches)),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep), donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(graphdef, c.mesh.context_layout,
                                           loss_chunks(c, mesh, c.train.global_batch)),
                      in_shardings=(param_sh, batch_sh))
  return Setup(graphdef, names, tx, lr_fn, param_sh, state_sh, batch_sh,
               ckpt_lib.abstract_with_shardings(abstract_state, state_sh), create, from_params,
               train_step, eval_step, mesh, c.model.attention)


def loss_chunks(c: config_lib.Config, mesh: jax.sharding.Mesh, rows: int) -> int:
  """How many chunks of positions the loss of `rows` rows takes for about train.loss_chunk
  tokens per device each (0: train.loss_chunk=0, all logits at once)."""
  if not c.train.loss_chunk:
    return 0
  local_rows = max(rows // sharding.batch_divisor(mesh), 1)
  context = int(mesh.shape["context"])
  return loss_lib.n_chunks(c.data.seq_len, c.train.loss_chunk * context // local_rows, context)


def check_runtime(c: config_lib.Config, mesh: jax.sharding.Mesh) -> None:
  """What depends on the devices: the batch must split over data*fsdp, microbatches and
  processes; cuDNN attention needs an NVIDIA GPU (Hopper or later for packed documents)."""
  c = resolved(c, mesh)
  platform = mesh.devices.flat[0].platform
  n = int(mesh.shape["context"])  # mesh.context=-1 resolved
  config_lib.check_context(c, n)
  for length in c.train.passkey_lengths:
    config_lib.check_context_length(c.model.attention, c.mesh, n, length, "train.passkey_lengths")
  if c.model.attention == "cudnn" and platform != "gpu":
    raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU but this run has {platform} "
                      "devices; use model.attention='xla' (or 'auto')")
  if c.model.attention == "cudnn" and attention.platform_key(mesh.devices.flat[0]) != "gpu":
    raise ConfigError(f"model.attention='cudnn' takes packed documents from Hopper on, and "
                      f"this is a {mesh.devices.flat[0].device_kind}; use model.attention='pallas'")
  ways = sharding.batch_divisor(mesh) * c.train.microbatches
  if c.train.global_batch % ways:
    raise ConfigError(
        f"train.global_batch={c.train.global_batch} is not divisible by mesh data*fsdp "
        f"({sharding.batch_divisor(mesh)}) x train.microbatches ({c.train.microbatches}) = "
        f"{ways}; use a multiple of {ways}")
  if c.train.global_batch % jax.process_count():
    raise ConfigError(f"train.global_batch={c.train.global_batch} is not divisible by the "
                      f"{jax.process_count()} processes")
