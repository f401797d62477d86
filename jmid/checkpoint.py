"""Orbax checkpoints: workdir/checkpoints/<step>/{state, data, meta}.

`state` is the train state (params, optimizer, step), `data` the Grain iterator state (so a
resumed run sees exactly the batches an uninterrupted run would), `meta` JSON that describes the
checkpoint on its own (model spec, config, tokens seen, lr). Saves are async; Orbax writes into a
temporary folder and renames it on commit, so a crash never leaves a step that looks complete.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jmid.config import UserError


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A manager that saves whenever asked (train.py decides when) and keeps `keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         meta: dict[str, Any]) -> None:
  """Starts an async save of state, data iterator position and metadata at `step`."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Any) -> tuple[Any, dict[str, Any]]:
  """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs) in place of
  random init, sets `data_iter` to its saved position, and returns (state, meta)."""
  try:
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError, FileNotFoundError) as e:
    path = os.path.join(str(manager.directory), str(step))
    raise UserError(f"checkpoint {path} cannot be restored into this model ({_first_line(e)}); "
                    "use the config it was saved with, or a fresh run.workdir") from None
  return out["state"], dict(out["meta"])


def resolve_step_dir(path: str) -> str:
  """A run's workdir (its latest checkpoint) or one checkpoint step folder -> the step folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "state")):
    return path
  ckpt_dir = os.path.join(path, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) \
      if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise UserError(f"init.from_path={path}: not a jmid workdir with checkpoints nor a "
                    "checkpoint step folder (one holding state/); point it at one")
  return os.path.join(ckpt_dir, str(steps[-1]))


def load_params(path: str, abstract_params: Any) -> Any:
  """Only the params of another run's checkpoint, placed on the shardings `abstract_params`
  carries (the optimizer state in the file is never read)."""
  step_dir = resolve_step_dir(path)
  target = {"params": abstract_params}
  try:
    out = ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise UserError(f"init.from_path: {step_dir} does not hold params of this model "
                    f"({_first_line(e)}); check model.* against the source run") from None
  return out["params"]


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else type(e).__name__
