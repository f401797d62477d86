"""Orbax checkpoints: workdir/checkpoints/<step>/{state, data, meta}.

`state` is the train state (params, optimizer, step[, ema]), `data` the Grain iterator state
(so a resumed run sees exactly the batches an uninterrupted run would), `meta` JSON that
describes the checkpoint on its own (model spec, config, lineage, tokens seen, lr). Saves are
async. Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it (plus a
commit_success.txt) only when every item is written, and the manager lists finalized steps
only, so a crash never leaves a step that looks complete (tests/test_checkpoint.py checks it).

`python -m jmid.checkpoint info PATH` prints what a checkpoint holds; `python -m
jmid.checkpoint average --out=DIR CKPT...` averages params (jmid/averaging.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jmid import cli
from jmid.errors import UserError, first_line
from jmid.safetensors_io import is_hf_folder


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
  path = os.path.join(str(manager.directory), str(step))
  _check_process_count(path)
  check_shapes(path, abstract_state, "", "use the model.* it was saved with (python -m "
               "jmid.checkpoint info shows them), or a fresh run.workdir")
  try:
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise UserError(f"checkpoint {path} cannot be restored ({first_line(e)}); it is damaged "
                    "or from another config: move it aside to resume from an older step, or "
                    "use a fresh run.workdir") from None
  return out["state"], dict(out["meta"])


def _check_process_count(step_dir: str) -> None:
  """The data iterator state is per process: an exact resume needs the same process count."""
  data = os.path.join(step_dir, "data")
  names = os.listdir(data) if os.path.isdir(data) else []
  n = jax.process_count()
  if names and f"process_{jax.process_index()}-of-{n}.json" not in names:
    saved = sorted({name.rsplit("-of-", 1)[-1].split(".")[0] for name in names if "-of-" in name})
    raise UserError(
        f"checkpoint {step_dir} holds the data position of {'/'.join(saved) or '?'} processes, "
        f"this run has {n}: resume with the same process count, or start a new run (fresh "
        f"run.workdir) from it with init.from_path={step_dir} init.load=params+optimizer")


def resolve_step_dir(path: str, what: str = "init.from_path") -> str:
  """A run's workdir (its latest checkpoint) or one checkpoint step folder -> the step folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "state")):
    return path
  if os.path.isdir(path) and is_hf_folder(path):
    raise UserError(f"{what}={path} is a Hugging Face folder, not a jmid checkpoint; "
                    "init.from_path takes it, this command does not")
  ckpt_dir = os.path.join(path, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) \
      if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise UserError(f"{what}={path}: not a jmid workdir with checkpoints nor a checkpoint "
                    "step folder (one holding state/); point it at one")
  return os.path.join(ckpt_dir, str(steps[-1]))


def read_meta(step_dir: str) -> dict[str, Any]:
  """The checkpoint's meta JSON; {} for a checkpoint written without one (e.g. by hand)."""
  path = os.path.join(step_dir, "meta", "metadata")
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"checkpoint {step_dir}: meta/metadata is unreadable ({first_line(e)}); "
                    "the checkpoint is damaged, use another step") from None


def lineage_entry(step_dir: str, meta: dict[str, Any], load: str) -> dict[str, Any]:
  """What a run records of a checkpoint it started from: where, how, and its step/tokens/lr."""
  return {"from": step_dir, "load": load, "step": meta.get("step"), "tokens": meta.get("tokens"),
          "lr": meta.get("lr"), "run": meta.get("config", {}).get("run", {}).get("name")}


def saved_shapes(step_dir: str) -> dict[str, tuple[int, ...]]:
  """{'params.blocks.wq': shape, ...} for every array in state/, read from Orbax metadata."""
  state_dir = os.path.join(step_dir, "state")
  try:
    # the handler, not a Checkpointer: it does not look for (and warn about) step metadata
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    tree = getattr(meta, "tree", meta)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  except Exception as e:
    raise UserError(f"checkpoint {step_dir}: state/ is unreadable ({first_line(e)}); it is "
                    "damaged or not a jmid checkpoint: use another step") from None
  return {path_str(p): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}


def check_shapes(step_dir: str, target: Any, prefix: str, fix: str) -> None:
  """Raises one UserError naming every array whose saved shape differs from `target`'s."""
  shapes = saved_shapes(step_dir)
  bad = []
  for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    key = prefix + path_str(p)
    if key not in shapes:
      bad.append(f"{key} missing")
    elif shapes[key] != tuple(leaf.shape):
      bad.append(f"{key} {shapes[key]} vs {tuple(leaf.shape)}")
  if bad:
    more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
    raise UserError(f"checkpoint {step_dir} does not fit the model (checkpoint vs model: "
                    f"{'; '.join(bad[:4])}{more}); {fix}")


def restore_tree(step_dir: str, target: Any) -> Any:
  """Restores the part of state/ that `target` (ShapeDtypeStructs with shardings) names."""
  try:
    return ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
  except Exception as e:
    raise UserError(f"checkpoint {step_dir} cannot be read ({first_line(e)}); it is damaged: "
                    "use another step") from None


def save_params(out_dir: str, params: Any, meta: dict[str, Any]) -> None:
  """A standalone step folder {state: {params}, meta} that init.from_path and export accept.

  Written into out_dir.tmp and renamed, so a crash leaves nothing that looks complete."""
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + ".tmp"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(os.path.join(tmp, "meta"))
  ocp.PyTreeCheckpointer().save(os.path.join(tmp, "state"), {"params": params})
  with open(os.path.join(tmp, "meta", "metadata"), "w") as f:
    json.dump(meta, f)
  os.replace(tmp, out_dir)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def path_str(path: tuple) -> str:
  """A jax key path as Orbax names it: keys and indices joined by dots."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  from jmid import averaging, ckpt_info
  usage = ("usage: python -m jmid.checkpoint info PATH | "
           "python -m jmid.checkpoint average --out=DIR [--key=params|ema] CKPT CKPT ...")
  if argv[:1] == ["info"] and len(argv) == 2:
    print(ckpt_info.describe(resolve_step_dir(argv[1], "PATH")))
    return 0
  if argv[:1] == ["average"]:
    averaging.main(argv[1:])
    return 0
  raise UserError(usage)


if __name__ == "__main__":
  sys.exit(main())
