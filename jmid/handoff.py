"""Starting a stage from another run's checkpoint (`config.init.from_path`).

The state is always at step 0 with fresh data; what is carried is chosen by `init.load`:
'params' (fresh optimizer), 'params+optimizer' (AdamW moments and bias-correction count too;
the lr schedule still starts at its step 0) or 'ema' (the source's EMA of params, as params).
A larger vocabulary is the one shape change handled here: new embedding and LM-head rows start
at the mean of the old ones (new optimizer moments at 0). RoPE base/scaling and seq_len carry
no params, so they simply change. Any other shape difference is one error naming the arrays.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jmid import checkpoint as ckpt_lib
from jmid.checkpoint.meta import Origin
from jmid import fs, hf
from jmid import sharding
from jmid.errors import UserError
from jmid.safetensors_io import is_hf_folder

STATE_KEY = {"params": "params", "params+optimizer": "params", "ema": "ema"}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A jmid checkpoint step folder to start from, with its meta."""

  path: str
  meta: ckpt_lib.Meta

  @property
  def lr(self) -> float:
    if self.meta.lr is None:
      raise UserError(f"optim.lr_from_checkpoint: {self.path} stores no lr in its meta; "
                      "set optim.lr explicitly and optim.lr_from_checkpoint=False")
    return self.meta.lr


@dataclasses.dataclass(frozen=True)
class HfFolder:
  """A Hugging Face folder to start from: its config.json (checked by hf.read_config) and
  the family it names."""

  path: str
  config: dict[str, Any]

  @property
  def architecture(self) -> str:
    return self.config["architectures"][0]

  @property
  def lr(self) -> float:
    raise UserError(f"optim.lr_from_checkpoint: {self.path} is a Hugging Face folder, which "
                    "stores no lr; set optim.lr explicitly and optim.lr_from_checkpoint=False")


Source = Checkpoint | HfFolder


def find(path: str) -> Source:
  """A jmid workdir or step folder (its newest step), or a Hugging Face folder."""
  full = fs.absolute(path, "init.from_path")
  if not fs.is_remote(full) and os.path.isdir(full) and is_hf_folder(full):
    return HfFolder(full, hf.read_config(full))
  step_dir = ckpt_lib.resolve_step_dir(path)
  return Checkpoint(step_dir, ckpt_lib.read_meta(step_dir))


def _load_hf(source: HfFolder, load: str, model: Any, abstract_params: Any) -> Any:
  """Params from a HF folder; its config.json must describe this run's model.* exactly."""
  if load != "params":
    raise UserError(f"init.load={load!r}: a Hugging Face folder holds params only; use "
                    "init.load='params'")
  diff = hf.contradictions(model, source.config, source.path)
  if diff:
    raise UserError(f"init.from_path={source.path}: this run's model contradicts its "
                    f"config.json: {'; '.join(diff[:4])}; set those model.* keys")
  return hf.load_params(source.path, abstract_params)


def lineage(source: Source, load: str) -> list[Origin]:
  """This run's origin first, then the source's own lineage, back to the first stage."""
  if isinstance(source, HfFolder):
    return [Origin(source.path, load, architecture=source.architecture)]
  return [source.meta.origin(source.path, load), *source.meta.lineage]


def _grow_axes(names: tuple, saved: tuple[int, ...], want: tuple[int, ...]) -> bool:
  """True when the shapes differ only along 'vocab' axes, and only by growing."""
  diff = [i for i, (a, b) in enumerate(zip(saved, want)) if a != b]
  return len(saved) == len(want) and bool(diff) and all(
      names[i] == "vocab" and want[i] > saved[i] for i in diff)


def _saved_abstract(source: Source, key: str, abstract_params: Any, names: Any) -> Any:
  """abstract_params with the shapes stored in the checkpoint (vocab may be smaller)."""
  shapes = ckpt_lib.saved_shapes(source.path)
  bad = []

  def saved(path: tuple, leaf: jax.ShapeDtypeStruct, n: tuple) -> jax.ShapeDtypeStruct:
    name = f"{key}.{ckpt_lib.path_str(path)}"
    if name not in shapes:
      bad.append(f"{name} missing")
      return leaf
    if shapes[name] != leaf.shape and not _grow_axes(n, shapes[name], leaf.shape):
      bad.append(f"{name} {shapes[name]} vs {leaf.shape}")
    return jax.ShapeDtypeStruct(shapes[name], leaf.dtype)

  out = jax.tree_util.tree_map_with_path(saved, abstract_params, names)
  ours = {f"{key}.{ckpt_lib.path_str(p)}" for p, _ in
          jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  bad += [f"{k} not in this model" for k in sorted(shapes)
          if k.startswith(key + ".") and k not in ours]
  if not any(k.startswith(key + ".") for k in shapes):
    hint = " (train with train.ema_decay > 0 to keep one)" if key == "ema" else ""
    raise UserError(f"init.load={key!r}: {source.path} holds no {key}{hint}; "
                    "use init.load='params'")
  if bad:
    more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
    raise UserError(
        f"init.from_path: {source.path} holds another architecture (checkpoint vs model: "
        f"{'; '.join(bad[:4])}{more}); set model.* like the source run (python -m "
        "jmid.checkpoint info shows its spec); only a larger vocab_size can change")
  return out


def _pad(x: jax.Array, shape: tuple[int, ...], fill: str) -> jax.Array:
  """Grows x to `shape`; new entries are the mean over the old rows of each axis, or zero."""
  for axis, (have, want) in enumerate(zip(x.shape, shape)):
    if have == want:
      continue
    if fill == "mean":
      new = jnp.broadcast_to(jnp.mean(x, axis=axis, keepdims=True),
                             x.shape[:axis] + (want - have,) + x.shape[axis + 1:])
    else:
      new = jnp.zeros(x.shape[:axis] + (want - have,) + x.shape[axis + 1:], x.dtype)
    x = jnp.concatenate([x, new.astype(x.dtype)], axis=axis)
  return x


def load_state(source: Source, load: str, mesh: jax.sharding.Mesh, abstract_state: Any,
               names: Any, tx: optax.GradientTransformation, state_from_params: Any,
               model: Any) -> Any:
  """The step-0 train state for this run, built from `source` onto this run's shardings."""
  abstract_params = abstract_state["params"]
  if isinstance(source, HfFolder):
    return state_from_params(_load_hf(source, load, model, abstract_params))
  param_sh = jax.tree.map(lambda a: a.sharding, abstract_params)
  saved = _saved_abstract(source, STATE_KEY[load], abstract_params, names)
  saved_sh = sharding.tree_shardings(mesh, names, saved)
  target = {STATE_KEY[load]: ckpt_lib.abstract_with_shardings(saved, saved_sh)}
  if load == "params+optimizer":
    saved_opt = jax.eval_shape(tx.init, saved)
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, saved_opt, saved_sh,
        transform_non_params=lambda _: sharding.replicated(mesh))
    target["opt_state"] = ckpt_lib.abstract_with_shardings(saved_opt, opt_sh)
  out = ckpt_lib.restore_tree(source.path, target)
  params = out[STATE_KEY[load]]
  if any(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape != b.shape, saved, abstract_params))):
    params = jax.jit(lambda p: jax.tree.map(lambda x, a: _pad(x, a.shape, "mean"), p,
                                            abstract_params), out_shardings=param_sh)(params)
  state = state_from_params(params)
  if load == "params+optimizer":
    opt = optax.tree_utils.tree_map_params(
        tx, lambda s, a: _pad(s, a.shape, "zero"), out["opt_state"], abstract_params)
    state["opt_state"] = jax.device_put(
        _restart_schedule(opt), jax.tree.map(lambda a: a.sharding, abstract_state["opt_state"]))
  return state


def _restart_schedule(opt_state: Any) -> Any:
  """Zeroes the lr-schedule step counters (the new stage's schedule starts at its step 0)
  and keeps AdamW's own count, which the carried moments' bias correction belongs to."""
  def reset(s: Any) -> Any:
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=jnp.zeros_like(s.count))
    return s
  return jax.tree.map(reset, opt_state,
                      is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
