"""`python -m jmid.train --config=configs/demo/pretrain.py [--config.section.key=value ...]`.

train(): config -> mesh -> abstract model -> shardings -> state created sharded under jit ->
resume (this workdir's latest checkpoint) or random init -> data -> loop of one jitted,
donated train_step; metrics every log step, eval, async checkpoints, and a final save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from jmid import cli  # first: it catches Ctrl-C from the first moment (cli.StopFlag)

if __name__ == "__main__":
  cli.STOP.install()

import jax
from absl import logging
from ml_collections import ConfigDict

from jmid import checkpoint as ckpt_lib
from jmid import config as config_lib
from jmid import distributed
from jmid import model as model_lib
from jmid import build, configfile, fs, handoff, loop, passkey, plan, resume, runtime, sharding
from jmid import workdir as workdir_lib
from jmid.errors import UserError
from jmid.data import pipeline



def train(cfg_dict: ConfigDict, stop_after: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the configured run; returns the last logged record.

  stop_after: process at most this many steps in this call, then checkpoint and return (for
  time-sliced jobs, notebooks and resume tests); the schedule is unchanged. SIGINT/SIGTERM
  during start-up undoes what the start created; during training it saves at the next step;
  either way train() then raises errors.Interrupted.
  """
  c = config_lib.from_configdict(cfg_dict)
  with cli.STOP.installed() as stop:
    run = _start(c, stop)
    try:
      with jax.set_mesh(run.su.mesh):
        last = loop.train_loop(run, stop, stop_after)
    finally:
      if run.lock:
        run.lock.release()
    where = "another process of this job got it; " if stop.elsewhere else ""
    stop.check(f"{where}checkpoint saved at step {last['step']}; run the same command to resume")
  return last


def _claim(c: config_lib.Config) -> tuple[workdir_lib.Claim, workdir_lib.Lock, str]:
  """Process 0 takes the workdir: refuses a folder that is not a run, and a busy one."""
  workdir_lib.check_is_run(c.run.workdir)
  claim = workdir_lib.Claim(c.run.workdir)
  fs.makedirs(c.run.workdir)
  lock, note = workdir_lib.acquire(c.run.workdir)
  claim.snapshot()
  return claim, lock, note


def _start(c: config_lib.Config, signals: cli.StopFlag) -> loop.Started:
  """Everything before the first step, in phases; a failure or a signal in any of them
  removes what this start created (the workdir itself, if it made it) and nothing else."""
  distributed.same_config(dataclasses.asdict(c))
  mesh = sharding.make_mesh(c.mesh)
  build.check_runtime(c, mesh)
  cache = runtime.compilation_cache(c.run.compilation_cache, mesh.devices.flat[0].platform)
  main_process = jax.process_index() == 0
  claim, lock, lock_note = _claim(c) if main_process else (None, None, "")
  manager = None
  try:
    signals.check()
    srcs = pipeline.open_sources(c.data)
    pipeline.check_vocab(srcs, c.model.vocab_size)
    passkey.check_lengths(c.train.passkey_lengths, c.data.seq_len, srcs.tokenizer,
                          "train.passkey_lengths")
    signals.check()
    ckpt_dir = os.path.join(c.run.workdir, "checkpoints")
    rolled = resume.rollback(ckpt_dir, c.train.resume_step) \
        if c.train.resume_step >= 0 and main_process else ""
    distributed.barrier("jmid-rollback")
    manager = ckpt_lib.make_manager(c.run.workdir, c.train.keep_checkpoints)
    latest = manager.latest_step()
    c, origin, changed = _origin(c, manager, latest)
    su = build.setup(c, mesh)
    compiled = plan.compile_train_step(c, su.train_step, su.abstract_state, su.batch_sh)
    plan.check_fits(c, compiled, mesh.devices.flat[0])
    su = dataclasses.replace(su, train_step=compiled)
    signals.check()
    local_batch = c.train.global_batch // jax.process_count()
    data_iter = pipeline.train_iterator(c.data, srcs, batch_size=local_batch, seed=c.run.seed,
                                        **distributed.process_shard())
    with jax.set_mesh(mesh):
      state, start, how = _initial_state(c, su, mesh, manager, latest, origin, data_iter)
    signals.check()
    start_lr = float(su.lr_fn(start))
    notes = [n for n in (lock_note, rolled, changed, *runtime.NOTES, cache) if n]
    if main_process:
      fs.write_text(os.path.join(c.run.workdir, "config.json"),
                    json.dumps(config_lib.to_json_dict(c), indent=2))
      n_params = model_lib.count_params(state["params"])
      print(f"jmid: {n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
            f"{jax.device_count()} {jax.devices()[0].platform} devices | attention "
            f"{su.attention} | {how} | "
            f"lr at step {start} {start_lr:.3e}" + "".join(f" | {n}" for n in notes), flush=True)
  except BaseException:
    if manager is not None:
      manager.close()
    if lock is not None:
      lock.release()
    if claim is not None:
      claim.undo()
    raise
  lineage = origin if isinstance(origin, list) else (
      handoff.lineage(origin, c.init.load) if origin else [])
  first = {"init": how, "init/lr": start_lr, **({"init/notes": notes} if notes else {})}
  return loop.Started(c, su, manager, state, start, data_iter, srcs, lineage, first, lock)


def _origin(c: config_lib.Config, manager: Any, latest: int | None
            ) -> tuple[config_lib.Config, handoff.Source | list | None, str]:
  """Where this run starts, the config with the lr it resolves to, and a note on what changed.

  On resume: this run's lineage from its own checkpoint, and (with optim.lr_from_checkpoint)
  the lr the first start resolved, so a restart never changes the schedule; every config key
  that differs from the checkpoint's is named, and changes that break an exact resume are
  refused unless allowed. On a first start from init.from_path: the source checkpoint.
  """
  if latest is not None:
    step_dir, meta = _newest_meta(manager)
    if c.optim.lr_from_checkpoint:
      c = _with_lr(c, meta.config_lr, manager.directory)
    changes = resume.config_changes(meta.full_config(), config_lib.to_json_dict(c))
    note = resume.check_changes(changes, c.train.allow_resume_changes, step_dir)
    return c, list(meta.lineage), note
  if not c.init.from_path:
    return c, None, ""
  source = handoff.find(c.init.from_path)
  if c.optim.lr_from_checkpoint:
    c = _with_lr(c, source.lr, source.path)
  return c, source, ""


def _newest_meta(manager: Any) -> tuple[str, ckpt_lib.Meta]:
  """The newest readable checkpoint meta (config, lineage and lr are the same for every step of
  a run; a damaged newest step is dealt with when the state is restored)."""
  err = None
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = os.path.join(str(manager.directory), str(step))
    try:
      return step_dir, ckpt_lib.read_meta(step_dir)
    except ckpt_lib.DamagedCheckpoint as e:
      err = e
  raise err or UserError(f"{manager.directory}: no checkpoint has a readable meta")


def _initial_state(c: config_lib.Config, su: build.Setup, mesh: jax.sharding.Mesh, manager: Any,
                   latest: int | None, origin: Any, data_iter: Any) -> tuple[Any, int, str]:
  """(state, start step, how it started): resume, init.from_path, or random init."""
  if latest is not None:
    state, _, step, notes = ckpt_lib.restore_latest_intact(manager, su.abstract_state, data_iter)
    if step != latest:  # damaged newer steps: kept for inspection, out of Orbax's way
      damaged = [s for s in manager.all_steps() if s > step]
      aside = os.path.join(str(manager.directory), "damaged-*")
      if jax.process_index() == 0:
        aside = resume.set_aside(str(manager.directory), damaged, "damaged", {"resumed": step})
      distributed.barrier("jmid-damaged")
      manager.reload()
      notes.append(f"damaged checkpoints {', '.join(map(str, damaged))} moved to {aside}")
    return state, step, "; ".join([f"resumed from {manager.directory}/{step}", *notes])
  if isinstance(origin, (handoff.Checkpoint, handoff.HfFolder)):
    state = handoff.load_state(origin, c.init.load, mesh, su.abstract_state, su.param_names,
                               su.tx, su.state_from_params, c.model)
    fresh_opt = ", fresh optimizer" if c.init.load != "params+optimizer" else ""
    return state, 0, f"{c.init.load} from {origin.path}{fresh_opt}"
  return su.create_state(), 0, "random init"


def _with_lr(c: config_lib.Config, lr: float | None, where: Any) -> config_lib.Config:
  if lr is None:
    raise UserError(f"optim.lr_from_checkpoint: {where} has no stored lr; set optim.lr and "
                    "optim.lr_from_checkpoint=False")
  return dataclasses.replace(c, optim=dataclasses.replace(c.optim, lr=float(lr)))


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  cfg = configfile.parse([sys.argv[0], *argv])
  runtime.NOTES[:] = runtime.set_env_defaults()  # before any jax backend starts
  logging.set_verbosity(logging.WARNING)
  cli.quiet_library_errors()
  distributed.initialize()
  train(cfg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
