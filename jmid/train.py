"""`python -m jmid.train --config=configs/demo/pretrain.py [--config.section.key=value ...]`.

train(): config -> mesh -> abstract model -> shardings -> state created sharded under jit ->
resume (this workdir's latest checkpoint) or random init -> data -> loop of one jitted,
donated train_step; metrics every log step, eval, async checkpoints, and a final save.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from jmid import checkpoint as ckpt_lib
from jmid import config as config_lib
from jmid import distributed
from jmid import metrics as metrics_lib
from jmid import model as model_lib
from jmid import cli, handoff, optim, sharding, steps
from jmid.errors import ConfigError, UserError
from jmid.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (Python).")


class _StopRequest:
  """Set by SIGTERM/SIGINT; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self) -> None:
    self.requested = False

  def __call__(self, signum: int, frame: Any) -> None:
    del frame
    self.requested = True
    metrics_lib.eprint(f"jmid: got signal {signum}; saving a checkpoint at the next step")


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


def setup(c: config_lib.Config, mesh: jax.sharding.Mesh) -> Setup:
  """Abstract model -> logical shardings -> jitted create / train / eval with explicit shardings."""
  graphdef, abstract_params, names = model_lib.abstract_model(c.model)
  param_sh = sharding.tree_shardings(mesh, names, abstract_params)
  tx = optim.make_optimizer(c.optim, c.train.steps)
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
                            c.train.ema_decay),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep), donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(graphdef), in_shardings=(param_sh, batch_sh))
  return Setup(graphdef, names, tx, lr_fn, param_sh, state_sh, batch_sh,
               ckpt_lib.abstract_with_shardings(abstract_state, state_sh), create, from_params,
               train_step, eval_step)


def check_runtime(c: config_lib.Config, mesh: jax.sharding.Mesh) -> None:
  """What depends on the devices: the batch must split over data*fsdp, microbatches and
  processes; cuDNN attention needs an NVIDIA GPU."""
  platform = mesh.devices.flat[0].platform
  if c.model.attention == "cudnn" and platform != "gpu":
    raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU but this run has {platform} "
                      "devices; use model.attention='xla'")
  ways = sharding.batch_divisor(mesh) * c.train.microbatches
  if c.train.global_batch % ways:
    raise ConfigError(
        f"train.global_batch={c.train.global_batch} is not divisible by mesh data*fsdp "
        f"({sharding.batch_divisor(mesh)}) x train.microbatches ({c.train.microbatches}) = "
        f"{ways}; use a multiple of {ways}")
  if c.train.global_batch % jax.process_count():
    raise ConfigError(f"train.global_batch={c.train.global_batch} is not divisible by the "
                      f"{jax.process_count()} processes")


def to_global(batch: dict[str, np.ndarray], batch_sh: jax.sharding.Sharding) -> dict:
  """This process's rows -> global arrays sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}


class Evaluator:
  """Mean loss per target token and bits per byte, per source and over all sources."""

  def __init__(self, eval_step: Any, eval_sets: dict[str, list[dict]],
               bytes_per_token: dict[str, float]) -> None:
    self.eval_step, self.eval_sets, self.bytes_per_token = eval_step, eval_sets, bytes_per_token

  def __call__(self, params: dict) -> dict[str, float]:
    out, total_ce, total_n = {}, 0.0, 0.0
    for source, batches in self.eval_sets.items():
      if not batches:
        continue
      sums = [self.eval_step(params, b) for b in batches]
      ce = float(sum(s["ce_sum"] for s in sums))
      n = float(sum(s["count"] for s in sums))
      loss = ce / max(n, 1.0)
      out[f"eval/{source}/loss"] = loss
      out[f"eval/{source}/bpb"] = loss / math.log(2) / self.bytes_per_token[source]
      total_ce, total_n = total_ce + ce, total_n + n
    out["eval/loss"] = total_ce / max(total_n, 1.0)
    return out


class MixCounter:
  """Realised token share of each source over a log interval (padding not counted)."""

  def __init__(self, names: list[str]) -> None:
    self.names, self.counts = names, np.zeros(len(names))

  def add(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Counts the batch's rows and returns it without `source` (which stays on the host)."""
    batch = dict(batch)
    tokens = (batch["segment_ids"] != 0).sum(axis=1)
    self.counts += np.bincount(batch.pop("source"), weights=tokens, minlength=len(self.names))
    return batch

  def shares(self) -> dict[str, float]:
    total = max(self.counts.sum(), 1.0)
    out = {f"mix/{n}": float(c / total) for n, c in zip(self.names, self.counts)}
    self.counts[:] = 0
    return out


def train(cfg_dict: ConfigDict, stop_after: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the configured run; returns the last logged record.

  stop_after: process at most this many steps in this call, then checkpoint and return, exactly
  as on SIGTERM (for time-sliced jobs, notebooks and resume tests); the schedule is unchanged.
  """
  c = config_lib.from_configdict(cfg_dict)
  mesh = sharding.make_mesh(c.mesh)
  check_runtime(c, mesh)
  main_process = jax.process_index() == 0
  srcs = pipeline.open_sources(c.data)
  pipeline.check_vocab(srcs, c.model.vocab_size)
  fresh = not os.path.exists(c.run.workdir)
  manager = ckpt_lib.make_manager(c.run.workdir, c.train.keep_checkpoints)
  latest = manager.latest_step()
  try:
    c, origin = _origin(c, manager, latest)
    su = setup(c, mesh)
    local_batch = c.train.global_batch // jax.process_count()
    shard = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    data_iter = pipeline.train_iterator(c.data, srcs, batch_size=local_batch,
                                        seed=c.run.seed, **shard)
    with jax.set_mesh(mesh):
      state, start, how = _initial_state(c, su, mesh, manager, latest, origin, data_iter)
  except UserError:
    manager.close()
    if fresh and main_process:  # a start that failed leaves no workdir behind
      _remove_if_no_files(c.run.workdir)
    raise
  with jax.set_mesh(mesh):
    start_lr = float(su.lr_fn(start))
    if main_process:
      with open(os.path.join(c.run.workdir, "config.json"), "w") as f:
        json.dump(config_lib.to_json_dict(c), f, indent=2)
      n_params = model_lib.count_params(state["params"])
      print(f"jmid: {n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
            f"{jax.device_count()} {jax.devices()[0].platform} devices | {how} | "
            f"lr at step {start} {start_lr:.3e}", flush=True)
    eval_sets = {name: [to_global(b, su.batch_sh) for b in batches]
                 for name, batches in pipeline.eval_batches(
                     c.data, srcs, batch_size=local_batch, n_batches=c.train.eval_batches,
                     seed=c.run.seed, **shard).items()}
    evaluator = Evaluator(su.eval_step, eval_sets, pipeline.bytes_per_token(c.data, srcs,
                                                                            c.run.seed))
    baseline = pipeline.unigram_loss(c.data, srcs, c.run.seed, c.model.vocab_size)
    lineage = origin if isinstance(origin, list) else (
        handoff.lineage(origin, c.init.load) if origin else [])
    first = {"init": how, "init/lr": start_lr}
    last = _loop(c, su, manager, state, data_iter, evaluator, srcs.names, start, baseline,
                 main_process, stop_after, lineage, first)
  if main_process and "eval/loss" in last:
    print(f"jmid: done at step {last['step']}: eval loss {last['eval/loss']:.4f} "
          f"(unigram baseline {baseline:.4f}) | workdir {c.run.workdir}", flush=True)
  return last


def _origin(c: config_lib.Config, manager: Any, latest: int | None
            ) -> tuple[config_lib.Config, handoff.Source | list | None]:
  """Where this run starts, and the config with the lr it resolves to.

  On resume: this run's lineage from its own checkpoint, and (with optim.lr_from_checkpoint)
  the lr the first start resolved, so a restart never changes the schedule. On a first start
  from init.from_path: the source checkpoint. Otherwise None.
  """
  if latest is not None:
    meta = ckpt_lib.read_meta(os.path.join(str(manager.directory), str(latest)))
    if c.optim.lr_from_checkpoint:
      c = _with_lr(c, meta.get("config", {}).get("optim", {}).get("lr"), manager.directory)
    return c, list(meta.get("lineage", []))
  if not c.init.from_path:
    return c, None
  source = handoff.find(c.init.from_path)
  if c.optim.lr_from_checkpoint:
    c = _with_lr(c, source.lr, source.step_dir)
  return c, source


def _initial_state(c: config_lib.Config, su: Setup, mesh: jax.sharding.Mesh, manager: Any,
                   latest: int | None, origin: Any, data_iter: Any) -> tuple[Any, int, str]:
  """(state, start step, how it started): resume, init.from_path, or random init."""
  if latest is not None:
    state, _ = ckpt_lib.restore(manager, latest, su.abstract_state, data_iter)
    return state, latest, f"resumed from {manager.directory}/{latest}"
  if isinstance(origin, handoff.Source):
    state = handoff.load_state(origin, c.init.load, mesh, su.abstract_state, su.param_names,
                               su.tx, su.state_from_params, c.model)
    fresh_opt = ", fresh optimizer" if c.init.load != "params+optimizer" else ""
    return state, 0, f"{c.init.load} from {origin.step_dir}{fresh_opt}"
  return su.create_state(), 0, "random init"


def _remove_if_no_files(path: str) -> None:
  """Removes a folder tree made only of empty folders (what a failed first start created)."""
  if all(not files for _, _, files in os.walk(path)):
    shutil.rmtree(path, ignore_errors=True)


def _with_lr(c: config_lib.Config, lr: float | None, where: Any) -> config_lib.Config:
  if lr is None:
    raise UserError(f"optim.lr_from_checkpoint: {where} has no stored lr; set optim.lr and "
                    "optim.lr_from_checkpoint=False")
  return dataclasses.replace(c, optim=dataclasses.replace(c.optim, lr=float(lr)))


def _loop(c: config_lib.Config, su: Setup, manager: Any, state: dict, data_iter: Any,
          evaluator: Evaluator, names: list[str], start: int, baseline: float,
          main_process: bool, stop_after: int | None, lineage: list[dict[str, Any]],
          first: dict[str, Any]) -> dict[str, Any]:
  """The training loop; only log steps synchronise with the device.

  `first` (how the run started, the lr at its first step) goes into the first record logged.
  """
  writer = metrics_lib.MetricsWriter(c.run.workdir, c.train.steps, start, main_process)
  stop = _StopRequest()
  old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  tokens_per_step = c.train.global_batch * c.data.seq_len
  flops = metrics_lib.flops_per_token(c.model, c.data.seq_len)
  peak = metrics_lib.peak_flops(jax.devices()[0])
  watch, since_log, last = metrics_lib.Stopwatch(), 0, {"step": start}
  mix = MixCounter(names)

  def meta(step: int) -> dict[str, Any]:
    return {"step": step, "tokens": step * tokens_per_step, "lr": float(su.lr_fn(step)),
            "model": dataclasses.asdict(c.model), "config": config_lib.to_json_dict(c),
            "lineage": lineage, "ema": c.train.ema_decay > 0}

  step = start
  end = c.train.steps if stop_after is None else min(c.train.steps, start + stop_after)
  try:
    while step < end and not stop.requested:
      state, m = su.train_step(state, to_global(mix.add(next(data_iter)), su.batch_sh))
      step += 1
      since_log += 1
      if step == start + 1:  # the first step carries compilation: keep it out of tok/s
        jax.block_until_ready(m)
        watch.reset()
        since_log = 0
      eval_now = step == c.train.steps or bool(
          c.train.eval_every_steps and step % c.train.eval_every_steps == 0)
      if eval_now or step % c.train.log_every_steps == 0:
        record = {k: float(v) for k, v in jax.device_get(m).items()}
        dt = watch.elapsed()
        tps = since_log * tokens_per_step / dt if since_log else None
        record.update(tokens=step * tokens_per_step, tokens_per_sec=tps,
                      mfu=tps * flops / (peak * jax.device_count()) if peak and tps else None,
                      **mix.shares())
        record.update(first)
        first = {}
        if eval_now:
          t0 = time.perf_counter()
          record.update(evaluator(state["params"]))
          record["eval/unigram_baseline"] = baseline
          watch.paused += time.perf_counter() - t0
        eta = (c.train.steps - step) * dt / since_log if since_log else float("nan")
        writer.write(step, record, eta_seconds=eta)
        last = {"step": step, **record}
        watch.reset()
        since_log = 0
      if step % c.train.checkpoint_every_steps == 0 and step < c.train.steps:
        ckpt_lib.save(manager, step, state, data_iter, meta(step))
    if manager.latest_step() != step:
      ckpt_lib.save(manager, step, state, data_iter, meta(step))
    manager.wait_until_finished()
  finally:
    for s, h in old_handlers.items():
      signal.signal(s, h)
    writer.close()
    manager.close()
  return {**last, "step": step}


def parse_config(argv: list[str]) -> ConfigDict:
  """--config with its overrides applied, every failure as one ConfigError line.

  ml_collections defers errors: an unknown override key raises AttributeError while flags
  parse, and a config file that fails to load raises only when the config is first read.
  """
  try:
    flags.FLAGS(argv)
    cfg = _CONFIG.value
    if cfg is None:
      raise ConfigError("--config is required, e.g. --config=configs/demo/pretrain.py")
    cfg.to_dict()
  except ConfigError:
    raise
  except (AttributeError, KeyError) as e:
    raise ConfigError(f"an override names a config key that does not exist: {e}; "
                      "configs/base.py lists every key") from None
  except Exception as e:  # a bad flag value, a missing config file, or one that raised
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    raise ConfigError(f"--config: {lines[-1] if lines else repr(e)}") from None
  return cfg


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  cfg = parse_config([sys.argv[0], *argv])
  logging.set_verbosity(logging.WARNING)
  distributed.initialize()
  train(cfg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
