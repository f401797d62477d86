"""The training loop: steps, logging, evals, skipped non-finite steps, guarded saves.

train.py starts a run (workdir, mesh, compiled step, initial state) and hands it here as a
`Started`; only log and save steps synchronise with the device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax

from jmid import checkpoint as ckpt_lib
from jmid import cli
from jmid import config as config_lib
from jmid import metrics as metrics_lib
from jmid import attention, distributed, passkey, resume, sharding, steps
from jmid import workdir as workdir_lib
from jmid.checkpoint.meta import Origin
from jmid.data import pipeline
from jmid.errors import UserError, first_line, os_problem


@dataclasses.dataclass
class Started:
  """A run after start-up: everything the loop needs, and the workdir it holds."""

  c: config_lib.Config
  su: Any  # build.Setup, with the step compiled ahead of time
  manager: Any
  state: Any
  start: int
  data_iter: Any
  srcs: Any
  lineage: list[Origin]
  first: dict[str, Any]  # goes into the first metrics record: how the run started
  lock: workdir_lib.Lock | None


class _SkipWatch:
  """Counts non-finite (skipped) steps from the step metrics, fetched in batches so the loop
  syncs with the device no more often than it logs; stops the run after too many in a row."""

  def __init__(self, max_in_a_row: int, ckpt_dir: str) -> None:
    self.max, self.ckpt_dir = max_in_a_row, ckpt_dir
    self.pending: list[tuple[int, Any, Any]] = []
    self.in_a_row, self.interval = 0, 0
    self.last_finite: tuple[int, float] | None = None

  def add(self, step: int, m: dict[str, Any]) -> None:
    self.pending.append((step, m["skipped"], m["loss"]))

  def check(self) -> None:
    for step, skipped, loss in jax.device_get(self.pending):
      if skipped:
        self.in_a_row += 1
        self.interval += 1
      else:
        self.in_a_row, self.last_finite = 0, (step, float(loss))
      if self.in_a_row >= self.max:
        self._stop(step)
    self.pending = []

  def take_interval(self) -> int:
    n, self.interval = self.interval, 0
    return n

  def _stop(self, step: int) -> None:
    last = (f"the last finite loss was {self.last_finite[1]:.4f} at step {self.last_finite[0]}"
            if self.last_finite else "no step of this run was finite")
    have = resume.checkpoint_steps(self.ckpt_dir)
    raise UserError(
        f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss or gradient "
        f"and were skipped (params unchanged); {last}. Lower optim.lr (or raise "
        "optim.warmup_steps), or resume from an earlier checkpoint with "
        f"--config.train.resume_step=N (checkpoints: {', '.join(map(str, have)) or 'none'})")


def _passkey_eval(c: Any, su: Any, tokenizer: Any) -> Callable[[dict], dict[str, float]]:
  """params -> {eval/passkey/<length>: accuracy} (nothing without train.passkey_lengths)."""
  t = c.train
  if not t.passkey_lengths:
    return lambda params: {}
  predict = passkey.make_predict(su.graphdef, su.param_sh, su.mesh, c.mesh.context_layout)
  rows = sharding.batch_divisor(su.mesh)
  return lambda params: passkey.summary(passkey.evaluate(
      lambda x: predict(params, x), tokenizer, t.passkey_lengths, t.passkey_depths,
      t.passkey_samples, c.run.seed, rows))


def train_loop(run: Started, signals: cli.StopFlag, stop_after: int | None) -> dict[str, Any]:
  """The training loop; only log and save steps synchronise with the device.

  A save is refused if the state holds a non-finite value, and a save that fails (full disk,
  lost permission) stops the run: it never trains on past a checkpoint it could not write.
  With train.steps=0 the run evaluates its starting params (any checkpoint or Hugging Face
  folder, on this config's eval sets and passkey lengths), logs them as step 0 and keeps them
  as checkpoint 0.
  """
  c, su, manager, data_iter = run.c, run.su, run.manager, run.data_iter
  main_process = jax.process_index() == 0
  local_batch = c.train.global_batch // jax.process_count()
  eval_sets = {name: [_to_device(c, su, b, f"eval set {name}") for b in batches]
               for name, batches in pipeline.eval_batches(
                   c.data, run.srcs, batch_size=local_batch, n_batches=c.train.eval_batches,
                   seed=c.run.seed, **distributed.process_shard()).items()}
  short = [f"{name} {len(b)}" for name, b in eval_sets.items() if len(b) < c.train.eval_batches]
  if short and main_process:
    print(f"jmid: eval batches below train.eval_batches={c.train.eval_batches}, as many as the "
          f"held-out data fills: {', '.join(short)}", flush=True)
  evaluator = metrics_lib.Evaluator(su.eval_step, eval_sets,
                                    pipeline.bytes_per_token(c.data, run.srcs, c.run.seed))
  baseline = pipeline.unigram_loss(c.data, run.srcs, c.run.seed, c.model.vocab_size)
  passkey_eval = _passkey_eval(c, su, run.srcs.tokenizer)

  def evaluate(params: Any) -> dict[str, float]:
    """Held-out losses, passkey accuracy and the unigram baseline they compare with."""
    return {**evaluator(params), **passkey_eval(params), "eval/unigram_baseline": baseline}

  writer = metrics_lib.MetricsWriter(c.run.workdir, c.train.steps, run.start, main_process)
  tokens_per_step = c.train.global_batch * c.data.seq_len
  flops = metrics_lib.flops_per_token(c.model, c.data.seq_len)
  peak = metrics_lib.peak_flops(jax.devices()[0])
  watch, since_log, last = metrics_lib.Stopwatch(), 0, {"step": run.start}
  mix = metrics_lib.MixCounter(run.srcs.names)
  skips = _SkipWatch(c.train.max_skipped_steps, str(manager.directory))
  check_every = min(c.train.log_every_steps, c.train.max_skipped_steps)
  finite = jax.jit(steps.all_finite)
  first = run.first

  def save(step: int, state: Any) -> None:
    skips.check()
    if not bool(finite(state)):
      raise UserError(f"the train state holds a non-finite value at step {step}; it was not "
                      "saved. Resume from an earlier checkpoint (train.resume_step)")
    meta = ckpt_lib.Meta(step=step, tokens=step * tokens_per_step, lr=float(su.lr_fn(step)),
                         model=dataclasses.asdict(c.model), config=config_lib.to_json_dict(c),
                         lineage=tuple(run.lineage), ema=c.train.ema_decay > 0)
    check_saves()
    try:
      ckpt_lib.save(manager, step, run.state, data_iter, meta)
    except UserError:
      raise
    except Exception as e:
      raise _save_failed(e, manager) from None

  def check_saves() -> None:
    """Raises if an async save failed: the run stops instead of training on past it."""
    try:
      manager.check_for_errors()
    except Exception as e:
      raise _save_failed(e, manager) from None

  step = run.start
  end = c.train.steps if stop_after is None else min(c.train.steps, run.start + stop_after)
  vote, stop_for = distributed.StopVote(su.mesh), 0
  try:
    if c.train.steps == 0 == run.start:  # a 0-step run evaluates where it starts
      record = {**first, **evaluate(run.state["params"])}
      writer.write(0, record)
      last = {"step": 0, **record}
    while step < end and not stop_for:
      batch = _to_device(c, su, mix.add(next(data_iter)), f"the batch of step {step + 1}")
      run.state, m = su.train_step(run.state, batch)
      step += 1
      stop_for = vote.after_step(signals.signum)  # every process: the same step, the same answer
      since_log += 1
      skips.add(step, m)
      if step == run.start + 1:  # the first step carries compilation: keep it out of tok/s
        jax.block_until_ready(m)
        watch.reset()
        since_log = 0
      eval_now = step == c.train.steps or bool(
          c.train.eval_every_steps and step % c.train.eval_every_steps == 0)
      log_now = eval_now or step % c.train.log_every_steps == 0
      if log_now or step % check_every == 0:
        skips.check()
      if log_now:
        check_saves()
        if run.lock:
          run.lock.check()
        record = {k: float(v) for k, v in jax.device_get(m).items() if k != "skipped"}
        dt = watch.elapsed()
        tps = since_log * tokens_per_step / dt if since_log else None
        record.update(tokens=step * tokens_per_step, tokens_per_sec=tps,
                      mfu=tps * flops / (peak * jax.device_count()) if peak and tps else None,
                      skipped_steps=skips.take_interval(), **mix.shares())
        record.update(first)
        first = {}
        if eval_now:
          t0 = time.perf_counter()
          record.update(evaluate(run.state["params"]))
          watch.paused += time.perf_counter() - t0
        eta = (c.train.steps - step) * dt / since_log if since_log else float("nan")
        writer.write(step, record, eta_seconds=eta)
        last = {"step": step, **record}
        watch.reset()
        since_log = 0
      if step % c.train.checkpoint_every_steps == 0 and step < c.train.steps:
        save(step, run.state)
    if stop_for and not signals.signum:  # another process was signalled: stop as it does
      signals.signum, signals.elsewhere = stop_for, True
    if manager.latest_step() != step:
      save(step, run.state)
    try:
      manager.wait_until_finished()
    except Exception as e:
      raise _save_failed(e, manager) from None
    check_saves()
  except BaseException as e:
    _close_quietly(writer)  # a close failing as well (the same full disk) must not hide it
    cause = None if isinstance(e, UserError) else os_problem(e)
    if cause is None:
      raise
    raise UserError(f"{cause}; the run stopped and {_resume_point(manager)}: fix that and run "
                    "the same command to resume") from None
  else:
    writer.close()
  finally:
    _close_quietly(manager)
  if main_process and "eval/loss" in last and not signals.signum:
    print(f"jmid: done at step {last['step']}: eval loss {last['eval/loss']:.4f} "
          f"(unigram baseline {baseline:.4f}) | workdir {c.run.workdir}", flush=True)
  return {**last, "step": step}


def _to_device(c: config_lib.Config, su: Any, batch: dict, what: str) -> dict:
  """A host batch onto the mesh. With cuDNN attention its rows must fit the document slots of
  cuDNN's packed layout: a row past them would lose its last documents' attention."""
  if c.model.attention == "cudnn":
    n = attention.docs_per_row(batch["segment_ids"])
    if n > c.model.cudnn_max_docs:
      raise UserError(f"{what}: a row holds {n} documents, more than model.cudnn_max_docs="
                      f"{c.model.cudnn_max_docs} (the document slots of cuDNN's packed "
                      f"attention); set it to {n} or more, or use model.attention='pallas'")
  return sharding.to_global(batch, su.batch_sh)


def _save_failed(e: BaseException, manager: Any) -> UserError:
  """A failed save as one line: where, why, and the checkpoint a resume will start from."""
  where = str(manager.directory)
  cause = os_problem(e, where) or f"{where}: {first_line(e)}"
  return UserError(f"saving a checkpoint failed ({cause}); the run stopped and "
                   f"{_resume_point(manager)}: fix that and run the same command to resume")


def _resume_point(manager: Any) -> str:
  """The checkpoint a resume starts from, once a save still in flight has ended either way."""
  try:
    manager.wait_until_finished()
  except Exception:
    pass  # that save failed: it is not a checkpoint, and the caller reports why
  good = resume.checkpoint_steps(str(manager.directory))
  return f"step {good[-1]} is the last good checkpoint" if good else "no checkpoint was kept"


def _close_quietly(closable: Any) -> None:
  """Closes a checkpoint manager or metrics writer while an error is already on its way (or was
  reported): a second failure of the same cause, re-raised on close, must not replace it."""
  try:
    closable.close()
  except Exception:
    pass
