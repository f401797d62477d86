"""Orbax checkpoints: workdir/checkpoints/<step>/{state, data, meta}.

`state` is the train state (params, optimizer, step[, ema]), `data` the Grain iterator state
(so a resumed run sees exactly the batches an uninterrupted run would), `meta` JSON that
describes the checkpoint on its own (checkpoint/meta.py: model spec, config, lineage, tokens
seen, lr, and the fingerprints of every array: jmid/integrity.py). Saves are async. Orbax writes each step into
`<step>.orbax-checkpoint-tmp-*` and renames it (plus a commit_success.txt) only when every item
is written, and the manager lists finalized steps only, so a crash never leaves a step that
looks complete (tests/test_checkpoint.py checks it).

Every read checks what it got against the saved fingerprints: a checkpoint whose bytes rotted
is a `DamagedCheckpoint` (one line), never a silently wrong state; `restore_latest_intact`
then resumes from the newest intact step and leaves the damaged one where it is.

`python -m jmid.checkpoint info PATH` prints what a checkpoint holds, `verify PATH` checks every
array, `average --out=DIR CKPT...` averages params (the CLI: __main__.py, which alone imports
ckpt_info and averaging, so neither is imported back by this module).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jmid import cli, fs, integrity, resume
from jmid.checkpoint import legacy
from jmid.checkpoint.meta import Meta
from jmid.errors import UserError, first_line, os_problem
from jmid.integrity import path_str  # also ckpt_lib.path_str for the modules that name arrays
from jmid.safetensors_io import is_hf_folder


class DamagedCheckpoint(UserError):
  """A checkpoint whose files cannot be read (kind 'unreadable'), or whose arrays read back
  other than saved (kind 'changed')."""

  def __init__(self, step_dir: str, summary: str, message: str = "",
               kind: str = "unreadable") -> None:
    self.step_dir, self.summary, self.kind = step_dir, summary, kind
    parent = os.path.dirname(step_dir)
    run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else step_dir
    super().__init__(message or (
        f"checkpoint {step_dir} is damaged: {summary}; use an older step (python -m "
        f"jmid.checkpoint verify {run} lists the intact ones)"))


def names(keys: list[str], most: int = 3) -> str:
  """'a, b, c (+2 more)'."""
  more = f" (+{len(keys) - most} more)" if len(keys) > most else ""
  return ", ".join(keys[:most]) + more


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A manager that saves whenever asked (train.py decides when) and keeps `keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(fs.absolute(os.path.join(workdir, "checkpoints")),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         meta: Meta) -> None:
  """Starts an async save of state, data iterator position and metadata at `step`; the meta
  gets the state's fingerprints (computed on the devices: one small transfer)."""
  meta = dataclasses.replace(meta, fingerprints=integrity.fingerprints(state))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta.to_json())), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Any) -> tuple[Any, Meta]:
  """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs) in place of
  random init, checks it against the saved fingerprints, then sets `data_iter` to its saved
  position, and returns (state, meta). DamagedCheckpoint leaves `data_iter` untouched."""
  path = os.path.join(str(manager.directory), str(step))
  _check_process_count(path)
  check_shapes(path, abstract_state, "", "use the model.* it was saved with (python -m "
               "jmid.checkpoint info shows them), or a fresh run.workdir")
  meta = read_meta(path)
  as_saved = _as_saved(abstract_state, saved_arrays(path))
  old = legacy.is_old(_raw_tree(path))
  as_saved = legacy.to_old(as_saved) if old else as_saved
  out = _orbax_read(path, lambda: manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(as_saved))))
  restored = legacy.to_new(out["state"]) if old else out["state"]
  state = _cast(verify_tree(path, restored, meta), abstract_state)
  _restore_data(manager, step, path, data_iter)
  return state, meta


def restore_latest_intact(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any
                          ) -> tuple[Any, Meta, int, list[str]]:
  """(state, meta, step, notes) from the newest checkpoint that restores intact.

  A damaged step is skipped, left exactly where it is, and named in `notes` (one line each);
  any other error (shapes, process count) is raised at once."""
  damaged: list[DamagedCheckpoint] = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = restore(manager, step, abstract_state, data_iter)
    except DamagedCheckpoint as e:
      damaged.append(e)
      continue
    return state, meta, step, [f"checkpoint {e.step_dir} is damaged ({e.summary}); resumed "
                               f"from step {step} instead" for e in damaged]
  if not damaged:
    raise UserError(f"{manager.directory} holds no checkpoint to resume from")
  which = "; ".join(f"{os.path.basename(e.step_dir)}: {e.summary}" for e in damaged)
  raise DamagedCheckpoint(str(manager.directory), which, (
      f"every checkpoint in {manager.directory} is damaged ({which}); nothing was changed: "
      "restore a copy of the workdir, or start a fresh run.workdir (init.from_path can take "
      "another run's checkpoint)"))


def _restore_data(manager: ocp.CheckpointManager, step: int, step_dir: str,
                  data_iter: Any) -> None:
  """Sets data_iter to the step's position; a failure puts it back where it was."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  try:
    json.loads(fs.read_text(os.path.join(step_dir, "data", name)))
  except (OSError, ValueError) as e:
    raise DamagedCheckpoint(step_dir, f"data/{name} cannot be read ({first_line(e)})") from None
  before = data_iter.get_state()
  try:
    manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(data_iter)))
  except Exception as e:
    data_iter.set_state(before)
    raise UserError(f"checkpoint {step_dir}: its data position does not fit this run's data "
                    f"pipeline ({first_line(e)}); resume with the data.* it was saved with, "
                    "or start a fresh run.workdir") from None


def _check_process_count(step_dir: str) -> None:
  """The data iterator state is per process: an exact resume needs the same process count."""
  data = os.path.join(step_dir, "data")
  names_ = fs.listdir(data) if fs.isdir(data) else []
  n = jax.process_count()
  if names_ and f"process_{jax.process_index()}-of-{n}.json" not in names_:
    saved = sorted({x.rsplit("-of-", 1)[-1].split(".")[0] for x in names_ if "-of-" in x})
    raise UserError(
        f"checkpoint {step_dir} holds the data position of {'/'.join(saved) or '?'} processes, "
        f"this run has {n}: resume with the same process count, or start a new run (fresh "
        f"run.workdir) from it with init.from_path={step_dir} init.load=params+optimizer")


def resolve_step_dir(path: str, what: str = "init.from_path") -> str:
  """A run's workdir (its latest checkpoint) or one checkpoint step folder -> the step folder."""
  return step_dirs(path, what)[-1]


def step_dirs(path: str, what: str = "PATH") -> list[str]:
  """One checkpoint step folder -> [it]; a run's workdir -> its step folders, oldest first."""
  path = fs.absolute(path, what)
  if fs.isdir(os.path.join(path, "state")):
    return [path]
  if not fs.is_remote(path) and os.path.isdir(path) and is_hf_folder(path):
    raise UserError(f"{what}={path} is a Hugging Face folder, not a jmid checkpoint; "
                    "init.from_path takes it, this command does not")
  ckpt_dir = os.path.join(path, "checkpoints")
  steps = resume.checkpoint_steps(ckpt_dir)
  if not steps:
    raise UserError(f"{what}={path}: not a jmid workdir with checkpoints nor a checkpoint "
                    "step folder (one holding state/); point it at one")
  return [os.path.join(ckpt_dir, str(s)) for s in steps]


def read_meta(step_dir: str) -> Meta:
  """The checkpoint's meta, of whichever version wrote it; Meta() for a checkpoint written
  without one (e.g. by hand)."""
  path = os.path.join(step_dir, "meta", "metadata")
  if not fs.exists(path):
    return Meta(version=1)
  try:
    raw = json.loads(fs.read_text(path))
  except (OSError, ValueError) as e:
    raise DamagedCheckpoint(step_dir, f"meta/metadata is unreadable ({first_line(e)})") from None
  return Meta.from_json(raw, f"checkpoint {step_dir}")


def saved_tree(step_dir: str) -> Any:
  """state/'s tree as saved (dicts and lists of Orbax ArrayMetadata: shape, dtype), its
  names as today's model has them (checkpoint/legacy.py)."""
  return legacy.to_new(_raw_tree(step_dir))


def _raw_tree(step_dir: str) -> Any:
  """state/'s tree with the names it was saved under."""
  try:
    # the handler, not a Checkpointer: it does not look for (and warn about) step metadata
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.join(step_dir, "state")))
    return getattr(meta, "tree", meta)
  except Exception as e:
    raise DamagedCheckpoint(step_dir, f"state/ is unreadable ({first_line(e)})") from None


def saved_arrays(step_dir: str) -> dict[str, jax.ShapeDtypeStruct]:
  """{'params.blocks.wq': ShapeDtypeStruct(shape, saved dtype), ...} for every array in state/."""
  leaves = jax.tree_util.tree_flatten_with_path(saved_tree(step_dir))[0]
  return {path_str(p): jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
          for p, leaf in leaves if hasattr(leaf, "shape")}


def saved_shapes(step_dir: str) -> dict[str, tuple[int, ...]]:
  """{'params.blocks.wq': shape, ...} for every array in state/, read from Orbax metadata."""
  return {k: a.shape for k, a in saved_arrays(step_dir).items()}


def check_shapes(step_dir: str, target: Any, prefix: str, fix: str) -> None:
  """Raises one UserError naming every array whose saved shape differs from `target`'s, and
  (without a prefix: the whole state) every saved array `target` lacks."""
  shapes = saved_shapes(step_dir)
  bad, ours = [], set()
  for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    key = prefix + path_str(p)
    ours.add(key)
    if key not in shapes:
      bad.append(f"{key} missing")
    elif shapes[key] != tuple(leaf.shape):
      bad.append(f"{key} {shapes[key]} vs {tuple(leaf.shape)}")
  if not prefix:
    bad += [f"{key} not in this run" for key in sorted(set(shapes) - ours)]
  if bad:
    raise UserError(f"checkpoint {step_dir} does not fit the model (checkpoint vs model: "
                    f"{names(bad, 4)}); {fix}")


def verify_tree(step_dir: str, tree: Any, meta: Meta) -> Any:
  """`tree` (arrays read from step_dir, named from the state's root) if its fingerprints match
  those saved in meta; a checkpoint saved without them is accepted unverified."""
  saved = {legacy.new_key(k): v for k, v in meta.fingerprints.items()}
  if saved:
    bad = integrity.compare(saved, integrity.fingerprints(tree))
    if bad:
      raise DamagedCheckpoint(step_dir, f"{names(bad)} differ from the fingerprints recorded "
                              "when it was saved", kind="changed")
  return tree


def restore_tree(step_dir: str, target: Any) -> Any:
  """Restores the part of state/ that `target` (ShapeDtypeStructs with shardings) names: read
  in the saved dtypes, checked against the saved fingerprints, then cast to target's dtypes."""
  as_saved = _as_saved(target, saved_arrays(step_dir))
  meta = read_meta(step_dir)
  out = _read(step_dir, as_saved, ocp.checkpoint_utils.construct_restore_args(as_saved), True)
  return _cast(verify_tree(step_dir, out, meta), target)


def read_array(step_dir: str, key: str, meta: Meta | None = None,
               tree: Any = None) -> jax.Array:
  """One array of state/ (named like 'params.blocks.wq') alone onto the CPU in its saved dtype,
  checked against its fingerprint: memory is about that one array. meta and tree (saved_tree)
  are read from step_dir unless given (a caller reading many arrays reads them once)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  tree = saved_tree(step_dir) if tree is None else tree
  if key not in {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}:
    raise UserError(f"checkpoint {step_dir} holds no array {key}")

  def one(p: tuple, m: Any) -> Any:  # Orbax skips PLACEHOLDER leaves: only `key` is read
    return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu) if path_str(p) == key \
        else ocp.PLACEHOLDER

  target = jax.tree_util.tree_map_with_path(one, tree)
  args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=cpu, global_shape=t.shape,
                                                     dtype=t.dtype)
                      if isinstance(t, jax.ShapeDtypeStruct) else ocp.PLACEHOLDER, target)
  out = _read(step_dir, target, args, False)
  leaf = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(out)[0]}[key]
  verify_tree(step_dir, {key: leaf}, read_meta(step_dir) if meta is None else meta)
  return leaf


def _read(step_dir: str, target: Any, restore_args: Any, partial: bool) -> Any:
  """state/ read by Orbax (target named as today's model names it, read under the names it
  was saved with); any failure becomes one line (_read_error)."""
  old = legacy.is_old(_raw_tree(step_dir))
  if old:
    target, restore_args = legacy.to_old(target), legacy.to_old(restore_args)
  out = _orbax_read(step_dir, lambda: ocp.PyTreeCheckpointer().restore(
      os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=partial)))
  return legacy.to_new(out) if old else out


def _orbax_read(step_dir: str, read: Callable[[], Any]) -> Any:
  """read(), an Orbax restore of step_dir; any failure becomes one line (_read_error), and what
  the failed read abandoned says nothing when it is freed (_quiet_abandoned_reads)."""
  _quiet_abandoned_reads()
  try:
    return read()
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    error = _read_error(e, step_dir)
  _collect_abandoned_reads()  # outside the except block: its traceback holds them
  raise error


def _as_saved(target: Any, saved: dict[str, jax.ShapeDtypeStruct]) -> Any:
  """target with the dtypes the arrays were saved in (fingerprints are of those bits)."""
  def swap(p: tuple, a: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    dtype = saved[path_str(p)].dtype if path_str(p) in saved else a.dtype
    return jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
  return jax.tree_util.tree_map_with_path(swap, target)


def _cast(tree: Any, target: Any) -> Any:
  return jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), tree, target)


def _read_error(e: BaseException, step_dir: str) -> UserError:
  """A failed read: a problem of this machine (permission, memory) as itself, else damage
  naming the array TensorStore could not read."""
  chain = []
  while e is not None and len(chain) < 20:
    chain.append(e)
    e = e.__cause__ or e.__context__
  machine = os_problem(chain[0], step_dir)
  missing = any(isinstance(x, OSError) and x.errno in (errno.ENOENT, errno.ENOTDIR)
                for x in chain)
  if machine and not missing:
    return UserError(f"checkpoint {step_dir} cannot be read: {machine}")
  reason = re.sub(r' in OCDBT database at local file "[^"]*"', "", first_line(chain[-1]))
  arrays = sorted(set(re.findall(r'reading "([^"/]+)/', str(chain[-1]))))
  what = names(arrays) if arrays else "state/"
  return DamagedCheckpoint(step_dir, f"{what} cannot be read ({reason})")


def _collect_abandoned_reads() -> None:
  """Frees now, at the failure, what the failed read left unreferenced, saying nothing: the
  one-line error already says what failed. Reads still in TensorStore's threads end later and
  are freed whenever the collector runs; _quiet_abandoned_reads keeps those silent too."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    gc.collect()


def _quiet_abandoned_reads() -> None:
  """Orbax closes its event loop as soon as one chunk read fails and abandons the others. When
  freed, they report through sys.unraisablehook ('Event loop is closed', their own failure) and
  through asyncio's logger ('Task exception was never retrieved', 'Task was destroyed but it is
  pending'): tracebacks long after the one-line error. Formatting such a traceback parses
  source (CPython 3.11's caret anchors); run by the collector inside another ast.parse, that
  crashed 3.11 with "AST constructor recursion depth mismatch". Drops exactly those reports,
  before anything formats them (installed once)."""
  cli.quiet_library_errors()
  previous = sys.unraisablehook
  if getattr(previous, "jmid_quiet", False):
    return

  def hook(u: Any) -> None:
    text = str(u.exc_value)
    if text != "Event loop is closed" and not text.startswith(
        "Encountered error while reading array index"):
      previous(u)

  hook.jmid_quiet = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def save_params(out_dir: str, params: Any, meta: Meta) -> None:
  """A standalone step folder {state: {params}, meta} that init.from_path and export accept.

  Written into out_dir.tmp and renamed, so a crash leaves nothing that looks complete."""
  out_dir = fs.absolute(out_dir, "--out")
  if fs.is_remote(out_dir):
    raise UserError(f"--out={out_dir}: write it to a local folder, then copy it up (gcloud "
                    "storage cp -r); init.from_path reads it from the bucket")
  tmp = out_dir + ".tmp"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(os.path.join(tmp, "meta"))
  state = {"params": params}
  ocp.PyTreeCheckpointer().save(os.path.join(tmp, "state"), state)
  with jax.default_device(jax.devices("cpu")[0]):  # host arrays: fingerprint them there
    meta = dataclasses.replace(meta, fingerprints=integrity.fingerprints(state))
  with open(os.path.join(tmp, "meta", "metadata"), "w") as f:
    json.dump(meta.to_json(), f)
  os.replace(tmp, out_dir)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)
