"""ConfigDict -> validated frozen dataclasses.

Modules receive these dataclasses, never the ConfigDict, so a layer cannot read a key it does not
declare. `validate` runs before anything heavy starts: a user's mistake becomes one ConfigError
line naming the key and the fix (train.py turns it into exit code 2).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import re
from typing import Any

from ml_collections import ConfigDict

from jmid import families, fs
from jmid.errors import ConfigError


ATTENTION = ("auto", "xla", "cudnn", "pallas")
# model.attention='auto': the first of these the model can use, per platform (cuDNN's fused
# attention ~630 TFLOP/s on an H100 at 8K; our Triton kernel ~360; xla holds [T, T] scores)
# (cuDNN takes packed documents from Hopper on: older GPUs are "gpu-sm8x")
AUTO_ATTENTION = {"gpu": ("cudnn", "pallas", "xla"), "gpu-sm8x": ("pallas", "xla"),
                  "tpu": ("pallas", "xla"), "cpu": ("xla",)}
CONTEXT_LAYOUTS = ("zigzag", "contiguous")  # jmid.ring says what each means
KERNEL_ROWS = 16  # a Pallas kernel block holds a multiple of 16 rows (Triton's dots)
KERNEL_TILE = 128  # longer ring chunks must be whole 128-row blocks (the TPU kernel's lanes)
REMAT = ("none", "full", "dots", "dots_no_batch")
# What a block saves by name for the backward pass with model.remat='save:NAME,...': the q/k/v
# projections (after RoPE), the attention output (before its projection), the attention
# projection, the MLP's gated hidden [tokens, d_ff], the MLP output; the rest is recomputed
REMAT_NAMES = ("qkv", "attn", "attn_out", "mlp_hidden", "mlp_out")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine", "linear", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt", "cosine")
PACKING = ("concat", "first_fit")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
LOADS = ("params", "params+optimizer", "ema")
FORMATS = ("tokens", "npy", "bin", "arrayrecord", "jsonl", "parquet")
KINDS = ("text", "chat")
INTERPOLATIONS = ("step", "linear")
DEMO_SOURCES = ("code", "math", "text", "chat")
# Config keys (and key prefixes) whose change breaks an exact resume: the data stream and the
# rows of every batch depend on them. A resume that changes one needs train.allow_resume_changes.
RESUME_BREAKING = ("data.seq_len", "train.global_batch", "data.sources", "data.demo",
                   "data.tokenizer", "data.packing", "data.shuffle", "data.eval_fraction",
                   "run.seed")
# Keys that may differ from the checkpoint's without a word: start-up controls, and where the run
# lives (a run folder may be moved or copied).
RESUME_SILENT = ("train.resume_step", "train.allow_resume_changes", "run.workdir")
MAX_SEQ_LEN = 1 << 22  # 4M tokens per row: beyond any model's context; catches typos like 1e9


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: str
  seed: int
  name: str
  compilation_cache: str = "~/.cache/jmid/xla"


# Layer kinds of model.layer_pattern: G global attention, L local (model.sliding_window, with
# model.rope_local_theta when set), N global without RoPE (SmolLM3's NoPE layers).
LAYER_KINDS = "GLN"
# model.norm_style: llama: normed x cast back, times w; gemma: x times (1 + w) in float32, then
# cast (weights stored as w, zero-init); olmo: x times w in float32, then cast.
NORM_STYLES = ("llama", "gemma", "olmo")
# model.norm_placement: pre: x + f(norm(x)) (Llama); pre_post: x + norm(f(norm(x))) (Gemma);
# post: x + norm(f(x)) (OLMo 2).
NORM_PLACEMENTS = ("pre", "pre_post", "post")
QK_NORM_SCOPES = ("head", "projection")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture; also written into every checkpoint so export needs no config file."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float
  norm_eps: float
  tie_embeddings: bool
  qkv_bias: bool
  qk_norm: bool
  attention: str
  remat: str
  param_dtype: str
  compute_dtype: str
  init_std: float
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_original_max_len: int = 0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_attention_factor: float = 0.0
  sliding_window: int = 0
  cudnn_max_docs: int = 32  # attention='cudnn': document slots per row of its packed layout
  scan_layers: bool = True  # False: the layers unrolled (longer compile; XLA counts every layer)
  family: str = ""  # the Hugging Face family (jmid/families.py); "" = none
  layer_pattern: str = ""  # the repeating group of layer kinds (LAYER_KINDS); "" = one kind
  rope_local_theta: float = 0.0  # RoPE base of local layers, unscaled; 0 = the global RoPE
  norm_style: str = "llama"  # NORM_STYLES
  norm_placement: str = "pre"  # NORM_PLACEMENTS
  qk_norm_scope: str = "head"  # head: per head (Qwen3, Gemma 3); projection: all heads (OLMo 2)
  mlp_activation: str = "silu"  # silu: SwiGLU; gelu_tanh: GeGLU (Gemma)
  embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)
  query_scale: float = 0.0  # logits scaled by query_scale ** -0.5; 0 = head width (Gemma: 256)
  attn_softcap: float = 0.0  # attention logits -> c tanh(logits / c) (Gemma 2); 0 = none
  final_softcap: float = 0.0  # LM-head logits capped the same way (Gemma 2); 0 = none

  @property
  def dh(self) -> int:
    """Per-head width, resolving head_dim=0 to d_model // n_heads."""
    return self.head_dim or self.d_model // self.n_heads

  @property
  def pattern(self) -> str:
    """The repeating group of layer kinds: layer_pattern, or every layer local when the
    model has one sliding window (Mistral), else global."""
    return self.layer_pattern or ("L" if self.sliding_window else "G")

  @property
  def layer_kinds(self) -> str:
    """Each layer's kind (LAYER_KINDS), the pattern repeated over n_layers (cut short at
    the end when n_layers is not a multiple of it, as Gemma 3's 26 layers of 5:1)."""
    p = self.pattern
    return (p * (self.n_layers // len(p) + 1))[:self.n_layers]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int
  fsdp: int
  tensor: int
  context: int
  context_layout: str = "zigzag"
  dcn_data: int = 0  # nodes/slices the data axis spans (over DCN/InfiniBand); 0 = all of them
  dcn_fsdp: int = 1  # nodes/slices the fsdp axis spans

  def context_chunks(self, n: int) -> int:
    """How many equal chunks a row is cut into for `n`-way context parallelism."""
    return 2 * n if self.context_layout == "zigzag" and n > 1 else n


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One data source; every key but path has a default, so a config names only what differs."""

  path: str  # a file, a directory or a glob
  weight: float = 1.0  # mixture weight when data.mixture is empty
  format: str = "tokens"  # tokens | npy | bin | arrayrecord | jsonl | parquet
  kind: str = "text"  # text | chat (messages; prompt tokens get no loss)
  field: str = ""  # jsonl/parquet column; "" = 'text' for text, 'messages' for chat
  dtype: str = "uint16"  # bin: token dtype (npy files carry their own)
  eos_id: int = -1  # npy/bin: the id that ends each document; -1 = the tokenizer's EOS
  eval_path: str = ""  # an explicit held-out set in the same format; "" = split one off


# (start_step, {source: weight}) stages of a mixture schedule, weights as token proportions.
MixtureStage = tuple[int, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class DataConfig:
  demo: bool
  cache_dir: str
  sources: dict[str, SourceConfig]
  seq_len: int
  eval_fraction: float
  packing: str
  shuffle: bool
  shuffle_seed: int = -1  # the order's seed; -1: run.seed (the eval split is always run.seed's)
  tokenizer: str = "byte"
  mixture: tuple[MixtureStage, ...] = ()
  mixture_interpolation: str = "step"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float
  end_lr: float
  schedule: str
  warmup_steps: int
  decay_steps: int
  decay_shape: str
  b1: float
  b2: float
  eps: float
  weight_decay: float
  decay_embeddings: bool
  clip_norm: float
  z_loss: float
  lr_from_checkpoint: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  global_batch: int
  microbatches: int
  log_every_steps: int
  eval_every_steps: int
  eval_batches: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  ema_decay: float = 0.0
  max_skipped_steps: int = 10
  loss_chunk: int = 1024  # tokens per device in each chunk of the LM head + loss; 0: all
  resume_step: int = -1
  allow_resume_changes: bool = False
  passkey_lengths: tuple[int, ...] = ()
  passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  passkey_samples: int = 2


@dataclasses.dataclass(frozen=True)
class InitConfig:
  from_path: str
  load: str


@dataclasses.dataclass(frozen=True)
class Config:
  run: RunConfig
  model: ModelConfig
  mesh: MeshConfig
  data: DataConfig
  optim: OptimConfig
  train: TrainConfig
  init: InitConfig


def _section(cls: type, name: str, d: dict[str, Any], defaults: bool = False) -> Any:
  """cls(**d), with one-line errors for unknown keys and (unless defaults) missing ones."""
  fields = {f.name for f in dataclasses.fields(cls)}
  required = {f.name for f in dataclasses.fields(cls)
              if not defaults or f.default is dataclasses.MISSING}
  unknown = sorted(set(d) - fields)
  missing = sorted(required - set(d))
  if unknown:
    raise ConfigError(f"{name}.{unknown[0]}: unknown key; valid keys are "
                      f"{', '.join(sorted(fields))}")
  if missing:
    raise ConfigError(f"{name}.{missing[0]}: missing; start your config from configs/base.py")
  return cls(**d)


def _tuples(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
  """Lists (what ConfigDict holds) as tuples, so the frozen config stays hashable."""
  return {k: tuple(v) if k in keys and isinstance(v, (list, tuple)) else v for k, v in d.items()}


def from_configdict(cfg: ConfigDict) -> Config:
  """Converts and validates; raises ConfigError with the offending key."""
  d = cfg.to_dict()
  sections = {f.name: f.type for f in dataclasses.fields(Config)}
  for name in d:
    if name not in sections:
      raise ConfigError(f"{name}: unknown config section; valid: {', '.join(sections)}")
  data = dict(d.get("data", {}))
  sources = {}
  for sname, s in (data.get("sources") or {}).items():
    if not isinstance(s, dict):
      raise ConfigError(f"data.sources.{sname}: must be a ConfigDict(path=..., weight=...)")
    sources[sname] = _section(SourceConfig, f"data.sources.{sname}", s, defaults=True)
  data["sources"] = sources
  data["mixture"] = _mixture(data.get("mixture") or ())
  c = Config(
      run=_section(RunConfig, "run", d.get("run", {})),
      model=_section(ModelConfig, "model", d.get("model", {})),
      mesh=_section(MeshConfig, "mesh", d.get("mesh", {})),
      data=_section(DataConfig, "data", data),
      optim=_section(OptimConfig, "optim", d.get("optim", {})),
      train=_section(TrainConfig, "train", _tuples(d.get("train", {}),
                                                   ("passkey_lengths", "passkey_depths"))),
      init=_section(InitConfig, "init", d.get("init", {})),
  )
  validate(c)
  return c


def _mixture(raw: Any) -> tuple[MixtureStage, ...]:
  """((step, {name: weight}), ...) from what a config may hold (tuples, lists, ConfigDicts)."""
  stages = []
  for i, stage in enumerate(raw):
    if not (isinstance(stage, (tuple, list)) and len(stage) == 2):
      raise ConfigError(f"data.mixture[{i}]: each stage is (start_step, {{source: weight}})")
    step, weights = stage
    weights = weights.to_dict() if hasattr(weights, "to_dict") else weights
    if not isinstance(weights, dict) or not isinstance(step, int):
      raise ConfigError(f"data.mixture[{i}]: each stage is (start_step, {{source: weight}})")
    stages.append((int(step), {str(k): float(v) for k, v in weights.items()}))
  return tuple(stages)


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def check_context(c: Config, n: int) -> None:
  """A row must cut into equal ring chunks, and the Pallas kernels must tile them."""
  if n == 1:
    return
  problem = attention_problem(c.model, c.model.attention, n)
  _check(problem is None, problem or "")
  check_context_length(c.model.attention, c.mesh, n, c.data.seq_len, "data.seq_len")


def check_context_length(attention: str, mesh: MeshConfig, n: int, length: int,
                         key: str) -> None:
  """`length` tokens (of data.seq_len, or a passkey length) must cut into the ring's chunks."""
  if n == 1:
    return
  chunks = mesh.context_chunks(n)
  per = " (2 per device: the zigzag layout)" if chunks == 2 * n else ""
  _check(length % chunks == 0, f"{key}={length} does not cut into {chunks} equal chunks for "
         f"mesh.context={n}{per}; use a multiple of {chunks}")
  chunk = length // chunks
  _check(attention != "pallas" or chunk % KERNEL_TILE == 0
         or (chunk < KERNEL_TILE and chunk % KERNEL_ROWS == 0),
         f"{key}={length} gives ring chunks of {chunk} tokens, which the Pallas kernel blocks "
         f"do not tile; make the chunks a multiple of {KERNEL_TILE} (or of {KERNEL_ROWS} below "
         f"{KERNEL_TILE}): {key} a multiple of {chunks * KERNEL_TILE}")


def attention_problem(m: ModelConfig, attention: str, context: int = 1) -> str | None:
  """Why the model cannot use this attention (one line naming the fix), or None. The one place
  these limits live: validation reports them, attention='auto' skips what they rule out."""
  if attention == "pallas" and not (m.dh < 128 or m.dh % 128 == 0):
    return (f"model.attention='pallas' needs a head width below 128 or a multiple of 128 (the "
            f"TPU kernel's lane tiling), got {m.dh}; use 'xla' or another model.head_dim")
  if attention != "cudnn":
    return None
  if m.attn_softcap:
    return ("model.attention='cudnn': cuDNN's flash attention cannot softcap its logits "
            f"(model.attn_softcap={m.attn_softcap}); use model.attention='pallas' or 'xla'")
  if m.compute_dtype not in ("bfloat16", "float16"):
    return (f"model.attention='cudnn' needs model.compute_dtype bfloat16 or float16, not "
            f"{m.compute_dtype!r}; change one of them")
  if m.n_kv_heads != m.n_heads and not _jax_at_least(0, 11, 2):
    return (f"model.attention='cudnn' with grouped-query heads ({m.n_heads} q, {m.n_kv_heads} "
            f"kv) and packed documents reads wrong keys before jax 0.11.2 (this is jax "
            f"{importlib.metadata.version('jax')}); upgrade jax or use model.attention='pallas'")
  if m.dh > 256 or m.dh % 8:
    return (f"model.attention='cudnn': cuDNN's flash attention takes head widths up to 256 "
            f"in multiples of 8, not {m.dh}; use model.attention='pallas'")
  if context > 1:
    return (f"mesh.context={context}: model.attention='cudnn' cannot run inside ring "
            "attention; use model.attention='pallas' (or 'xla')")
  return None


def choose_attention(m: ModelConfig, platform: str, context: int = 1,
                     unusable: tuple[str, ...] = ()) -> str:
  """The attention the model runs: model.attention, or for 'auto' the first of
  AUTO_ATTENTION[platform] with no attention_problem and not `unusable` on these devices."""
  if m.attention != "auto":
    return m.attention
  return next(a for a in AUTO_ATTENTION.get(platform, ("xla",))
              if a not in unusable and attention_problem(m, a, context) is None)


def _jax_at_least(*version: int) -> bool:
  """Whether the installed jax is at least `version` (a dev or rc build counts as its release)."""
  parts = re.findall(r"\d+", importlib.metadata.version("jax"))[:len(version)]
  return tuple(int(p) for p in parts) >= version


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
  _check(value in options, f"{key}={value!r}: unknown; choose one of {', '.join(options)}")


def validate(c: Config) -> None:
  """Checks values alone and against each other; device counts are checked in sharding.py."""
  m, o, t, dt = c.model, c.optim, c.train, c.data
  fs.check_scheme(c.run.workdir, "run.workdir")  # before anything is made under that name
  fs.check_scheme(c.init.from_path, "init.from_path")
  for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
    _check(getattr(m, key) > 0, f"model.{key}={getattr(m, key)}: must be a positive integer")
  _check(m.head_dim >= 0, f"model.head_dim={m.head_dim}: must be >= 0 (0 = d_model // n_heads)")
  _check(m.head_dim > 0 or m.d_model % m.n_heads == 0,
         f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
         "change one or set model.head_dim")
  _check(m.n_heads % m.n_kv_heads == 0,
         f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; "
         "use a divisor of n_heads")
  _check(m.dh % 2 == 0, f"model.head_dim={m.dh}: RoPE needs an even head width")
  _check(m.rope_theta > 0, f"model.rope_theta={m.rope_theta}: must be > 0")
  _choice("model.rope_scaling", m.rope_scaling, ROPE_SCALINGS)
  _check(m.sliding_window >= 0, f"model.sliding_window={m.sliding_window}: must be >= 0 "
         "(0 = full causal attention)")
  if m.rope_scaling != "none":
    _check(m.rope_factor >= 1, f"model.rope_factor={m.rope_factor}: the context extension "
           "factor must be >= 1")
  if m.rope_scaling in ("llama3", "yarn"):
    _check(m.rope_original_max_len > 0, f"model.rope_scaling={m.rope_scaling!r} needs "
           "model.rope_original_max_len (the pretraining context length), e.g. 8192")
  if m.rope_scaling == "llama3":
    _check(m.rope_high_freq_factor > m.rope_low_freq_factor > 0,
           f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
           f"model.rope_low_freq_factor={m.rope_low_freq_factor} > 0 (Llama 3.1: 4 and 1)")
  _check(m.norm_eps > 0, f"model.norm_eps={m.norm_eps}: must be > 0")
  _choice("model.attention", m.attention, ATTENTION)
  problem = attention_problem(m, m.attention)
  _check(problem is None, problem or "")
  if m.remat.startswith("save:"):
    bad = [n for n in m.remat[5:].split(",") if n not in REMAT_NAMES] or [""]
    _check(not bad[0], f"model.remat={m.remat!r}: {bad[0]!r} is no name; 'save:' takes "
           f"names from {', '.join(REMAT_NAMES)}, e.g. 'save:qkv,attn'")
  else:
    _choice("model.remat", m.remat, REMAT)
  _choice("model.param_dtype", m.param_dtype, DTYPES)
  _choice("model.compute_dtype", m.compute_dtype, DTYPES)
  _check(m.family in families.NAMES, f"model.family={m.family!r}: unknown; choose one of "
         f"{', '.join(families.FAMILIES)}, or '' for none")
  problem = families.mismatch(m.family, dataclasses.asdict(m))
  _check(not problem, f"model.family={m.family!r}: {problem}; set the switch as the family has "
         "it, or model.family='' for a model of jmid's own")
  bad = sorted(set(m.layer_pattern) - set(LAYER_KINDS))
  _check(not bad, f"model.layer_pattern={m.layer_pattern!r}: {bad[0] if bad else ''!r} is no "
         "layer kind; use G (global), L (local: model.sliding_window) and N (global, no RoPE)")
  _check("L" not in m.layer_pattern or m.sliding_window > 0,
         f"model.layer_pattern={m.layer_pattern!r} has local layers but model.sliding_window=0; "
         "set the window")
  _check(m.rope_local_theta >= 0, f"model.rope_local_theta={m.rope_local_theta}: must be >= 0 "
         "(0 = local layers use the global RoPE)")
  _choice("model.norm_style", m.norm_style, NORM_STYLES)
  _choice("model.norm_placement", m.norm_placement, NORM_PLACEMENTS)
  _choice("model.qk_norm_scope", m.qk_norm_scope, QK_NORM_SCOPES)
  _choice("model.mlp_activation", m.mlp_activation, MLP_ACTIVATIONS)
  for key in ("query_scale", "attn_softcap", "final_softcap"):
    _check(getattr(m, key) >= 0, f"model.{key}={getattr(m, key)}: must be >= 0 (0 = none)")
  _check(m.cudnn_max_docs > 0, f"model.cudnn_max_docs={m.cudnn_max_docs}: must be > 0")

  for key in ("data", "fsdp", "tensor", "context"):
    v = getattr(c.mesh, key)
    _check(v == -1 or v >= 1, f"mesh.{key}={v}: must be >= 1, or -1 for the remaining devices")
  _check([c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context].count(-1) <= 1,
         "mesh: at most one axis may be -1 (the remaining devices)")
  _choice("mesh.context_layout", c.mesh.context_layout, CONTEXT_LAYOUTS)
  _check(c.mesh.dcn_data >= 0, f"mesh.dcn_data={c.mesh.dcn_data}: must be >= 1, or 0 for every "
         "node/slice the fsdp axis does not span")
  _check(c.mesh.dcn_fsdp >= 1, f"mesh.dcn_fsdp={c.mesh.dcn_fsdp}: must be >= 1")
  if c.mesh.context > 1:
    check_context(c, c.mesh.context)

  _check(0 < dt.seq_len <= MAX_SEQ_LEN, f"data.seq_len={dt.seq_len}: must be a positive "
         f"integer of at most {MAX_SEQ_LEN:,} tokens per row")
  _check(dt.shuffle_seed >= -1, f"data.shuffle_seed={dt.shuffle_seed}: must be >= 0, or -1 "
         "for run.seed")
  _check(0.0 < dt.eval_fraction < 1.0,
         f"data.eval_fraction={dt.eval_fraction}: must be in (0, 1)")
  _choice("data.packing", dt.packing, PACKING)
  _check(dt.demo or bool(dt.sources),
         "data.sources is empty: name at least one source, or set data.demo=True")
  for name, s in dt.sources.items():
    _check(s.weight >= 0 and math.isfinite(s.weight),
           f"data.sources.{name}.weight={s.weight}: must be a finite number >= 0")
    _choice(f"data.sources.{name}.format", s.format, FORMATS)
    _choice(f"data.sources.{name}.kind", s.kind, KINDS)
    _choice(f"data.sources.{name}.dtype", s.dtype, ("uint16", "uint32", "int32"))
  if dt.sources and not dt.mixture:
    _check(sum(s.weight for s in dt.sources.values()) > 0,
           "data.sources: all weights are 0; give at least one source a positive weight")
  _choice("data.mixture_interpolation", dt.mixture_interpolation, INTERPOLATIONS)
  _validate_mixture(dt)

  _check(o.lr >= 0, f"optim.lr={o.lr}: must be >= 0")
  _check(0 <= o.end_lr <= o.lr or o.schedule == "constant",
         f"optim.end_lr={o.end_lr}: must be between 0 and optim.lr={o.lr}")
  _choice("optim.schedule", o.schedule, SCHEDULES)
  _choice("optim.decay_shape", o.decay_shape, DECAY_SHAPES)
  _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
  _check(o.decay_steps >= 0, f"optim.decay_steps={o.decay_steps}: must be >= 0")
  for key in ("b1", "b2"):
    _check(0 <= getattr(o, key) < 1, f"optim.{key}={getattr(o, key)}: must be in [0, 1)")
  _check(o.eps > 0, f"optim.eps={o.eps}: must be > 0")
  for key in ("weight_decay", "clip_norm", "z_loss"):
    _check(getattr(o, key) >= 0, f"optim.{key}={getattr(o, key)}: must be >= 0")

  _check(t.steps >= 0, f"train.steps={t.steps}: must be >= 0")
  _check(t.global_batch > 0, f"train.global_batch={t.global_batch}: must be > 0")
  _check(t.microbatches > 0, f"train.microbatches={t.microbatches}: must be > 0")
  _check(t.global_batch % t.microbatches == 0,
         f"train.global_batch={t.global_batch} is not divisible by "
         f"train.microbatches={t.microbatches}")
  _check(o.warmup_steps + (o.decay_steps if o.schedule == "wsd" else 0) <= t.steps
         or o.schedule == "constant" or t.steps == 0,
         f"optim.warmup_steps={o.warmup_steps} (+ decay_steps) exceeds train.steps={t.steps}; "
         "shorten the warmup or train longer")
  for key in ("log_every_steps", "eval_batches", "keep_checkpoints", "checkpoint_every_steps"):
    _check(getattr(t, key) > 0, f"train.{key}={getattr(t, key)}: must be > 0")
  _check(t.eval_every_steps >= 0, f"train.eval_every_steps={t.eval_every_steps}: must be >= 0")
  _check(t.max_skipped_steps > 0, f"train.max_skipped_steps={t.max_skipped_steps}: must be > 0")
  _check(t.loss_chunk >= 0, f"train.loss_chunk={t.loss_chunk}: must be >= 0 (0 = all logits "
         "at once)")
  _check(t.resume_step >= -1, f"train.resume_step={t.resume_step}: a checkpoint step of this "
         "workdir, or -1 for the latest")

  _check(all(isinstance(n, int) and n > 0 for n in t.passkey_lengths),
         f"train.passkey_lengths={t.passkey_lengths}: positive token counts, e.g. (1024, 4096)")
  _check(bool(t.passkey_depths) and all(0 <= d <= 1 for d in t.passkey_depths),
         f"train.passkey_depths={t.passkey_depths}: fractions in [0, 1], e.g. (0, 0.5, 1)")
  _check(t.passkey_samples > 0, f"train.passkey_samples={t.passkey_samples}: must be > 0")
  if c.mesh.context > 1:
    for n in t.passkey_lengths:
      check_context_length(c.model.attention, c.mesh, c.mesh.context, n, "train.passkey_lengths")
  _check(0 <= t.ema_decay < 1,
         f"train.ema_decay={t.ema_decay}: must be in [0, 1) (0 = no EMA)")
  _choice("init.load", c.init.load, LOADS)
  _check(c.init.from_path or not o.lr_from_checkpoint,
         "optim.lr_from_checkpoint=True needs init.from_path (the checkpoint whose lr to start "
         "from); set one, or give optim.lr explicitly")


def _validate_mixture(dt: DataConfig) -> None:
  """Stages start at step 0, increase, name known sources, and have non-negative weights."""
  if not dt.mixture:
    return
  known = set(dt.sources) | (set(DEMO_SOURCES) if dt.demo else set())
  _check(dt.mixture[0][0] == 0, f"data.mixture: the first stage starts at step "
         f"{dt.mixture[0][0]}; the schedule must cover step 0")
  for i, (step, weights) in enumerate(dt.mixture):
    if i:
      _check(step > dt.mixture[i - 1][0], f"data.mixture[{i}]: start step {step} is not after "
             f"the previous stage's {dt.mixture[i - 1][0]}; list stages in increasing order")
    for name, w in weights.items():
      _check(name in known, f"data.mixture[{i}] names unknown source {name!r}; "
             f"known: {', '.join(sorted(known))}")
      _check(w >= 0 and math.isfinite(w),
             f"data.mixture[{i}][{name!r}]={w}: weights must be finite and >= 0")
    _check(sum(weights.values()) > 0, f"data.mixture[{i}]: all weights are 0")


def to_json_dict(c: Config) -> dict[str, Any]:
  """The resolved config as plain JSON types (for config.json and checkpoint metadata)."""
  return dataclasses.asdict(c)
