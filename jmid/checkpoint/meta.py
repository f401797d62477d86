"""A checkpoint's meta (meta/metadata, JSON) as typed values: what a step holds, the model it
holds, the config that made it and the stages before it, read the same from every version of
jmid that wrote one.

Versions: 1 (no `version` key) stored the model spec twice (`model`, and `config.model`) and
named a layer's weights flat under `blocks`; 2 stores it once (`model`; `config` holds the rest)
and names them as jmid/nn makes them (checkpoint/legacy.py reads both). A meta of a newer
version than this jmid knows is refused in one line rather than half-read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jmid.errors import UserError

VERSION = 2


def _int(v: Any) -> int | None:
  return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: Any) -> float | None:
  return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _str(v: Any) -> str | None:
  return v if isinstance(v, str) else None


@dataclasses.dataclass(frozen=True)
class Origin:
  """One entry of a lineage: a checkpoint (or Hugging Face folder) a stage started from, how
  (`init.load`, or 'average(params)'), and where that source stood."""

  path: str
  load: str
  step: int | None = None
  tokens: int | None = None
  lr: float | None = None
  run: str | None = None  # the source run's run.name
  architecture: str | None = None  # a Hugging Face folder: its architectures[0]

  def to_json(self) -> dict[str, Any]:
    out = {"from": self.path, "load": self.load, "step": self.step, "tokens": self.tokens,
           "lr": self.lr, "run": self.run}
    return {**out, "architecture": self.architecture} if self.architecture else out

  @classmethod
  def from_json(cls, d: Any) -> Origin:
    d = d if isinstance(d, dict) else {}
    run = _str(d.get("run"))
    arch = _str(d.get("architecture"))
    if arch is None and run and run.startswith("hf:"):  # version 1 wrote it as a run name
      run, arch = None, run[3:]
    return cls(path=str(d.get("from", "?")), load=str(d.get("load", "?")),
               step=_int(d.get("step")), tokens=_int(d.get("tokens")), lr=_num(d.get("lr")),
               run=run, architecture=arch)


@dataclasses.dataclass(frozen=True)
class Meta:
  """What a checkpoint says about itself; Meta() is a checkpoint written without one."""

  step: int | None = None
  tokens: int | None = None  # tokens this stage trained on up to `step`
  lr: float | None = None  # the learning rate at `step`
  model: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields
  config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the rest of the config
  lineage: tuple[Origin, ...] = ()  # the stages before this one, newest first
  ema: bool = False  # state/ holds an EMA of the params
  averaged: tuple[str, ...] = ()  # `checkpoint average`: the step folders it averaged
  fingerprints: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  version: int = VERSION

  @property
  def run_name(self) -> str | None:
    return _str(self.config.get("run", {}).get("name"))

  @property
  def seq_len(self) -> int | None:
    return _int(self.config.get("data", {}).get("seq_len"))

  @property
  def tokenizer(self) -> str:
    return _str(self.config.get("data", {}).get("tokenizer")) or ""

  @property
  def config_lr(self) -> float | None:
    """optim.lr as the run resolved it (not the schedule's value at `step`)."""
    return _num(self.config.get("optim", {}).get("lr"))

  @property
  def empty(self) -> bool:
    """No meta was written (a checkpoint made by hand, or by a very early jmid)."""
    return not (self.model or self.config or self.fingerprints) and self.step is None

  def full_config(self) -> dict[str, Any]:
    """The run's whole config as config.to_json_dict gives it (the model section put back)."""
    return {**self.config, "model": self.model} if self.config else {}

  def origin(self, path: str, load: str) -> Origin:
    """The lineage entry of a stage that starts from this checkpoint."""
    return Origin(path, load, self.step, self.tokens, self.lr, self.run_name)

  def to_json(self) -> dict[str, Any]:
    out = {"version": self.version, "step": self.step, "tokens": self.tokens, "lr": self.lr,
           "model": self.model, "config": {k: v for k, v in self.config.items() if k != "model"},
           "lineage": [e.to_json() for e in self.lineage], "ema": self.ema,
           "fingerprints": self.fingerprints}
    return {**out, "averaged": list(self.averaged)} if self.averaged else out

  @classmethod
  def from_json(cls, d: Any, where: str = "meta") -> Meta:
    """A meta JSON of any version so far; {} (no meta) is Meta() of version 1."""
    if not isinstance(d, dict):
      raise UserError(f"{where}: expected a JSON object, got {type(d).__name__}")
    version = d.get("version", 1) if d else 1
    if not isinstance(version, int) or version > VERSION:
      raise UserError(f"{where}: meta version {version!r} was written by a newer jmid (this "
                      f"one reads up to {VERSION}); upgrade jmid to read it")
    config = dict(d.get("config") or {})
    model = d.get("model") or config.get("model") or {}
    config.pop("model", None)
    return cls(step=_int(d.get("step")), tokens=_int(d.get("tokens")), lr=_num(d.get("lr")),
               model=dict(model), config=config,
               lineage=tuple(Origin.from_json(e) for e in d.get("lineage") or []),
               ema=bool(d.get("ema", False)),
               averaged=tuple(str(x) for x in d.get("averaged") or []),
               fingerprints=dict(d.get("fingerprints") or {}), version=version)
