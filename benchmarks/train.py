"""Training throughput of jmid against PyTorch + transformers on the same model and batch.

  python benchmarks/train.py --config=C [--config.k=v ...] [--steps=20] [--rows-per-device=R]
                             [--peer [--peer-compile] [--peer-mask=causal|documents]]
                             [--out=benchmarks/results/train.json]
  python benchmarks/train.py --sweep [--sweep-scale=full|tiny] [--steps=10] [--peer]
                             [--out=benchmarks/results/train_sweep.json]

Why: "tokens/s" means little without a reference. The peer is the model a user would otherwise
train: the Hugging Face class jmid exports to (jmid.export.hf_config), with SDPA attention,
fused AdamW with jmid's betas, eps, weight decay and gradient clipping, bf16 autocast when jmid
computes in bf16 on a GPU (float32 otherwise), optionally torch.compile.

How: the config is built as `python -m jmid.train` builds it (jmid.configfile.parse, then
config.from_configdict). ONE fixed packed batch (random tokens, several documents per row:
segment ids in increasing runs, positions restarting at 0, loss mask all ones) is made with
numpy and given to both. Each system times its first step (compile included) on its own, then
`--steps` steps, waiting for the device only at the end. Reported per system: tokens/s, seconds
per step, compile seconds, MFU (jmid.metrics.flops_per_token over the datasheet peak; None
where no peak is known, e.g. CPUs), peak device memory and the first and last loss. The data
pipeline, checkpoints and metrics of the real loop are not in these numbers
(benchmarks/train_step.py measures what the loop adds).

Fairness, as it stands:
  * The peer runs on one device the rows one of jmid's devices runs (global_batch / devices)
    and `ratio` is jmid's tokens/s per device over the peer's; on one device, plain
    jmid tokens/s over peer tokens/s. With several devices the peer pays no communication.
  * --peer-mask=causal (default): the peer's SDPA runs plain causal attention (its flash
    kernel on GPUs), so the documents of a row see each other where jmid isolates them; this
    favours the peer slightly. transformers >= 4.54 would build a block-diagonal mask from the
    restarting position_ids by itself, so this mode registers transformers' own SDPA forward
    under another name, which skips the mask builder. --peer-mask=documents keeps that mask
    (same semantics as jmid, a materialised [rows, 1, T, T] mask, no flash kernel).
  * The peer follows no schedule: it trains at optim.lr while jmid warms up from 0, so the
    last losses are a sanity check, not a comparison.
  * model.remat='full' turns on the peer's gradient checkpointing; other remat policies have
    no transformers equivalent. jax's persistent compilation cache stays off.

On a GPU the peer runs first: jax's backend takes 90% of the GPU's memory when it starts
(jmid.runtime) and keeps it until the process ends, so the peer trains, releases its memory,
and then jax starts. The sweep runs every entry as a child process of this script (a crash or
an out-of-memory ends one entry, recorded as an error string, never the sweep) and writes the
JSON after each entry, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from jmid import config as config_lib  # noqa: E402
from jmid import build, cli, configfile, export, metrics, runtime, sharding  # noqa: E402

Result = dict[str, Any]
PEER_MASKS = ("causal", "documents")
_CAUSAL_SDPA = "sdpa_causal"  # transformers' SDPA forward under a name no mask builder knows


# ---------------------------------------------------------------------------------------------
# The config and the batch


def load_config(path: str, overrides: list[str]) -> config_lib.Config:
  """The config as `python -m jmid.train` builds it (one ConfigError line when it is wrong)."""
  cfg = configfile.parse(["benchmark", f"--config={path}", *overrides])
  return config_lib.from_configdict(cfg)


def with_global_batch(c: config_lib.Config, rows: int) -> config_lib.Config:
  return dataclasses.replace(c, train=dataclasses.replace(c.train, global_batch=rows))


def make_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A packed batch of random tokens: each row holds documents of seq_len/8 to seq_len/2
  tokens (the last one cut), segment ids 1, 2, ... per document, positions restarting at 0 in
  each, every target counted. int32 [rows, seq_len] per key of jmid.steps.BATCH_KEYS."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)
  segments = np.stack([_segment_row(rng, seq_len) for _ in range(rows)])
  starts = np.zeros_like(segments, dtype=bool)
  starts[:, 0] = True
  starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
  index = np.arange(seq_len)
  last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
          "positions": (index - last_start).astype(np.int32),
          "loss_mask": np.ones((rows, seq_len), np.int32)}


def _segment_row(rng: np.random.Generator, seq_len: int) -> np.ndarray:
  lengths: list[int] = []
  while sum(lengths) < seq_len:
    lengths.append(int(rng.integers(max(seq_len // 8, 1), max(seq_len // 2, 2))))
  ids = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
  return ids[:seq_len]


# ---------------------------------------------------------------------------------------------
# Timing, shared by both systems


def timed(step: Callable[[], Any], steps: int, wait: Callable[[Any], None]) -> Result:
  """First step (compile included) on its own, then `steps` steps waited for once at the end.
  `step` returns the step's loss (on the device); `wait` blocks until it and the state exist."""
  t0 = time.perf_counter()
  first = step()
  wait(first)
  compile_seconds = time.perf_counter() - t0
  last = first
  t0 = time.perf_counter()
  for _ in range(steps):
    last = step()
  wait(last)
  return {"step_seconds": (time.perf_counter() - t0) / max(steps, 1),
          "compile_seconds": compile_seconds,
          "loss_first": float(first), "loss_last": float(last)}


def throughput(timing: Result, tokens_per_step: int, flops_per_token: float,
               peak: float | None, devices: int) -> Result:
  tokens_per_sec = tokens_per_step / timing["step_seconds"]
  mfu = flops_per_token * tokens_per_sec / (peak * devices) if peak else None
  return {"tokens_per_sec": tokens_per_sec, **timing, "mfu": mfu}


def error_string(e: BaseException) -> str:
  """One line for the JSON: the exception's type and its first non-empty line."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def ratio(jmid: Result | None, peer: Result | None) -> float | None:
  """jmid's tokens/s per device over the peer's (one device)."""
  if not jmid or not peer or "error" in jmid or "error" in peer:
    return None
  return jmid["tokens_per_sec"] / jmid["devices"] / peer["tokens_per_sec"]


# ---------------------------------------------------------------------------------------------
# jmid


def run_jmid(c: config_lib.Config, batch: dict[str, np.ndarray], steps: int) -> Result:
  """jmid's jitted, donated train_step on the batch, already on the mesh."""
  mesh = sharding.make_mesh(c.mesh)
  build.check_runtime(c, mesh)
  su = build.setup(c, mesh)
  with jax.set_mesh(mesh):
    box = {"state": su.create_state()}
    on_mesh = sharding.to_global(batch, su.batch_sh)

    def step() -> jax.Array:
      box["state"], m = su.train_step(box["state"], on_mesh)
      return m["loss"]

    timing = timed(step, steps, lambda loss: jax.block_until_ready((box["state"], loss)))
  devices = jax.device_count()
  out = throughput(timing, c.train.global_batch * c.data.seq_len,
                   metrics.flops_per_token(c.model, c.data.seq_len),
                   metrics.peak_flops(jax.devices()[0]), devices)
  return {**out, "peak_memory_bytes": jax_peak_memory(), "devices": devices,
          "attention": build.attention_for(c, mesh), "remat": c.model.remat,
          "dtype": c.model.compute_dtype}


def jax_peak_memory() -> int | None:
  """The largest peak_bytes_in_use of this process's devices; None where they do not say."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


# ---------------------------------------------------------------------------------------------
# The peer: PyTorch + transformers


def torch_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def peer_model(c: config_lib.Config, device: str, mask: str) -> Any:
  """The Hugging Face model jmid exports this config to, randomly initialised, float32."""
  import torch
  import transformers
  from transformers.integrations.sdpa_attention import sdpa_attention_forward
  transformers.logging.set_verbosity_error()
  transformers.AttentionInterface.register(_CAUSAL_SDPA, sdpa_attention_forward)
  meta = {"model": dataclasses.asdict(c.model), "config": config_lib.to_json_dict(c)}
  hf = transformers.AutoConfig.for_model(**export.hf_config(meta, "float32"))
  hf.use_cache = False
  model = transformers.AutoModelForCausalLM.from_config(
      hf, attn_implementation=_CAUSAL_SDPA if mask == "causal" else "sdpa",
      dtype=torch.float32)
  if c.model.remat == "full":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  return model.to(device).train()


def peer_optimizer(model: Any, o: config_lib.OptimConfig, cuda: bool) -> Any:
  """AdamW with jmid's hyperparameters; no decay on norms and biases, nor on the embeddings
  and LM head unless optim.decay_embeddings (as jmid.optim decides)."""
  import torch
  decay, rest = [], []
  for name, p in model.named_parameters():
    embedding = "embed_tokens" in name or "lm_head" in name
    (decay if p.ndim >= 2 and (o.decay_embeddings or not embedding) else rest).append(p)
  groups = [{"params": decay, "weight_decay": o.weight_decay},
            {"params": rest, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                           **({"fused": True} if cuda else {}))


def weighted_loss(model: Any, inputs: Any, positions: Any, targets: Any, weights: Any) -> Any:
  """Mean per-token cross-entropy weighted by the loss mask, as jmid's loss."""
  import torch.nn.functional as F
  logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
  ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
  return (ce * weights.flatten()).sum() / weights.sum().clamp(min=1.0)


def run_peer(c: config_lib.Config, batch: dict[str, np.ndarray], steps: int, compile_: bool,
             mask: str) -> Result:
  """The same model and batch rows trained by PyTorch on one device."""
  import contextlib

  import torch
  device = torch_device()
  cuda = device == "cuda"
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  model = peer_model(c, device, mask)
  opt = peer_optimizer(model, c.optim, cuda)
  params = [p for p in model.parameters() if p.requires_grad]
  t = {k: torch.from_numpy(batch[k]).to(device) for k in ("inputs", "targets", "positions")}
  t = {k: v.long() for k, v in t.items()}
  weights = torch.from_numpy(batch["loss_mask"]).to(device).float()
  bf16 = cuda and c.model.compute_dtype == "bfloat16"
  autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (
      contextlib.nullcontext)
  loss_fn = torch.compile(weighted_loss) if compile_ else weighted_loss

  def step() -> Any:
    with autocast():
      loss = loss_fn(model, t["inputs"], t["positions"], t["targets"], weights)
    loss.backward()
    if c.optim.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, c.optim.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  timing = timed(step, steps, lambda _: torch.cuda.synchronize() if cuda else None)
  name = torch.cuda.get_device_name() if cuda else "cpu"
  rows, seq_len = batch["inputs"].shape
  out = throughput(timing, rows * seq_len, metrics.flops_per_token(c.model, seq_len),
                   metrics.peak_flops(types.SimpleNamespace(device_kind=name)), 1)
  return {**out, "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "devices": 1, "device": name, "rows": rows,
          "attention": "sdpa, causal" if mask == "causal" else "sdpa, documents",
          "dtype": "bfloat16 autocast" if bf16 else "float32", "compiled": compile_,
          "gradient_checkpointing": c.model.remat == "full",
          "torch": torch.__version__, "transformers": _transformers_version()}


def _transformers_version() -> str:
  import transformers
  return transformers.__version__


def release_torch_memory() -> None:
  """What the peer allocated goes back to the GPU, for jax to start with."""
  gc.collect()
  import torch
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def guarded(fn: Callable[[], Result]) -> Result:
  """fn's result, or {"error": one line} when it raised (out of memory, a bad device...)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - any failure is a result of the benchmark
    return {"error": error_string(e)}


# ---------------------------------------------------------------------------------------------
# One benchmark: both systems on one config


def jax_device_count(peer: bool) -> int:
  """jax's device count, without starting jax's GPU backend before the peer has run (torch
  sees the same CUDA devices jax would)."""
  if peer and runtime.gpu_likely() and torch_device() == "cuda":
    import torch
    return torch.cuda.device_count()
  return jax.device_count()


def peer_problem() -> str | None:
  """Why the peer should not run: jax on an accelerator, torch on the CPU (a CPU build)."""
  if torch_device() == "cuda":
    return None
  platform = jax.devices()[0].platform
  if platform == "cpu":
    return None
  return (f"torch sees no CUDA device (a CPU build of torch?) while jax runs on {platform}; "
          "the peer would train on the CPU")


def benchmark(args: argparse.Namespace, overrides: list[str]) -> Result:
  c = load_config(args.config, overrides)
  devices = jax_device_count(args.peer)
  if args.rows_per_device:
    c = with_global_batch(c, args.rows_per_device * devices)
  batch = make_batch(c.train.global_batch, c.data.seq_len, c.model.vocab_size)
  notes = []
  peer = None
  if args.peer:
    peer_rows = {k: v[:max(c.train.global_batch // devices, 1)] for k, v in batch.items()}
    problem = peer_problem()
    peer = {"error": problem} if problem else guarded(
        lambda: run_peer(c, peer_rows, args.steps, args.peer_compile, args.peer_mask))
    release_torch_memory()
    notes.append(PEER_NOTES[args.peer_mask])
    notes.append("the peer trains the rows of one jmid device on one device; ratio is jmid "
                 "tokens/s per device over the peer's tokens/s")
  jmid = guarded(lambda: run_jmid(c, batch, args.steps))
  return {"benchmark": "train", "config": args.config,
          "overrides": [o[len("--config."):] for o in overrides], "steps": args.steps,
          "global_batch": c.train.global_batch, "seq_len": c.data.seq_len,
          "tokens_per_step": c.train.global_batch * c.data.seq_len,
          "jmid": jmid, "peer": peer, "ratio": ratio(jmid, peer), "notes": notes}


PEER_NOTES = {
    "causal": "the peer's SDPA uses a plain causal mask, so the documents of a row are not "
              "isolated from each other (jmid isolates them); this favours the peer slightly",
    "documents": "the peer's SDPA gets the block-diagonal causal mask transformers builds from "
                 "the restarting position_ids (documents isolated as in jmid), materialised",
}


def summary(result: Result) -> Iterator[str]:
  for name in ("jmid", "peer"):
    r = result.get(name)
    if r is not None:
      yield f"{name:5s}: {_system_line(r)}"
  if result.get("ratio") is not None:
    yield f"ratio: {result['ratio']:.3f} (jmid tokens/s per device / peer tokens/s)"


def _system_line(r: Result) -> str:
  if "error" in r:
    return f"FAILED {r['error']}"
  mfu = f"mfu {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "mfu -"
  mem = (f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None
         else "peak -")
  return (f"{r['tokens_per_sec']:12,.0f} tok/s  {r['step_seconds'] * 1e3:9.1f} ms/step  "
          f"compile {r['compile_seconds']:6.1f} s  {mfu}  {mem}  "
          f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")


# ---------------------------------------------------------------------------------------------
# The sweep: sizes x sequence lengths, then attention kernels and remat policies at one point


SIZES: dict[str, dict[str, Any]] = {  # Llama-shaped: ~125M (GPT-2 small), Llama 3.2 1B and 3B
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048,
                 vocab_size=32000, tie_embeddings=False),
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
               vocab_size=128256, tie_embeddings=True),
    "3b": dict(d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192,
               vocab_size=128256, tie_embeddings=True),
}
SEQ_LENS = (2048, 4096, 8192, 16384)
TOKENS_PER_DEVICE = 16384  # rows per device = this // seq_len
VARIANTS_AT = ("1b", 8192)
ATTENTIONS = ("xla", "cudnn", "pallas")
REMATS = ("full", "dots", "save:qkv,attn")
TINY = dict(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=256, tie_embeddings=False)
TINY_LAYERS = {"125m": 1, "1b": 2, "3b": 3}
TINY_DIVISOR = 64  # tiny: every sequence length and the tokens per device over this


@dataclasses.dataclass(frozen=True)
class Entry:
  size: str
  seq_len: int
  attention: str = "auto"
  remat: str = "none"

  @property
  def name(self) -> str:
    name = f"{self.size}-{self.seq_len // 1024}k"
    name += "" if self.attention == "auto" else f"-attn={self.attention}"
    return name + ("" if self.remat == "none" else f"-remat={self.remat}")

  @property
  def peer_key(self) -> tuple[str, int, bool]:
    """What the peer depends on: the same key, the same peer run."""
    return self.size, self.seq_len, self.remat == "full"


def sweep_entries() -> list[Entry]:
  grid = [Entry(size, seq) for size in SIZES for seq in SEQ_LENS]
  size, seq = VARIANTS_AT
  return (grid + [Entry(size, seq, attention=a) for a in ATTENTIONS]
          + [Entry(size, seq, remat=r) for r in REMATS])


def entry_args(e: Entry, scale: str) -> list[str]:
  """The command-line arguments of one entry, on configs/base.py."""
  if scale == "tiny":
    model = {**TINY, "n_layers": TINY_LAYERS[e.size]}
    seq_len, tokens, dtype = e.seq_len // TINY_DIVISOR, TOKENS_PER_DEVICE // TINY_DIVISOR, "float32"
  else:
    model, seq_len, tokens, dtype = SIZES[e.size], e.seq_len, TOKENS_PER_DEVICE, "bfloat16"
  sets = {f"model.{k}": v for k, v in model.items()}
  sets.update({"model.attention": e.attention, "model.remat": e.remat,
               "model.compute_dtype": dtype, "data.seq_len": seq_len, "data.demo": True})
  return ([f"--config.{k}={v}" for k, v in sets.items()]
          + [f"--rows-per-device={max(tokens // seq_len, 1)}"])


def run_entry(e: Entry, args: argparse.Namespace, peer: bool, tmp: str) -> Result:
  """One entry in a child process; its JSON, or what it said when it wrote none."""
  out = os.path.join(tmp, f"{len(os.listdir(tmp))}.json")
  cmd = [sys.executable, os.path.abspath(__file__), f"--config={args.config}",
         *entry_args(e, args.sweep_scale), f"--steps={args.steps}", f"--out={out}",
         f"--peer-mask={args.peer_mask}"]
  cmd += ["--peer"] if peer else []
  cmd += ["--peer-compile"] if peer and args.peer_compile else []
  base: Result = {"name": e.name, "size": e.size, "attention": e.attention, "remat": e.remat}
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=args.run_timeout)
  except subprocess.TimeoutExpired:
    return {**base, "error": f"timed out after {args.run_timeout} s"}
  if os.path.exists(out):
    with open(out) as f:
      return {**base, **json.load(f)}
  lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
  return {**base, "error": f"exit code {proc.returncode}: {lines[-1].strip()}"[:500]}


def share_peers(runs: list[Result], entries: list[Entry]) -> None:
  """Entries that ran no peer take the peer of the entry with the same peer key."""
  measured = {e.peer_key: r for e, r in zip(entries, runs) if r.get("peer")}
  for e, r in zip(entries, runs):
    source = measured.get(e.peer_key)
    if "jmid" in r and not r.get("peer") and source is not None:
      r["peer_from"] = source["name"]
      r["ratio"] = ratio(r["jmid"], source["peer"])


def sweep(args: argparse.Namespace) -> Result:
  entries = sweep_entries()
  runs: list[Result] = []
  peered: set[tuple[str, int, bool]] = set()
  result = {"benchmark": "train_sweep", "config": args.config, "scale": args.sweep_scale,
            "steps": args.steps, "peer": args.peer, "runs": runs}
  with tempfile.TemporaryDirectory() as tmp:
    for e in entries:
      peer = args.peer and e.peer_key not in peered
      t0 = time.perf_counter()
      runs.append(run_entry(e, args, peer, tmp))
      if runs[-1].get("peer"):  # measured, or failed in a way the same peer would fail again
        peered.add(e.peer_key)
      share_peers(runs, entries[:len(runs)])
      print(f"[{len(runs)}/{len(entries)}] {e.name} ({time.perf_counter() - t0:.0f} s)",
            flush=True)
      for line in _entry_lines(runs[-1]):
        print(f"    {line}", flush=True)
      _write_partial(args.out, result)  # no jax here: its GPU backend would take the memory
  return result


def _entry_lines(r: Result) -> Iterator[str]:
  if "error" in r:
    yield f"FAILED {r['error']}"
  else:
    yield from summary(r)
    if r.get("peer_from"):
      yield f"(peer from {r['peer_from']})"


def _write_partial(path: str, result: Result) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """The script's flags, and the --config.k=v overrides (passed to jmid's config parser)."""
  overrides = [a for a in argv if a.startswith("--config.")]
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default=None,
                  help="default configs/demo/pretrain.py; --sweep: configs/base.py")
  ap.add_argument("--steps", type=int, default=None, help="timed steps after the first "
                  "(default 20; 10 per entry in --sweep)")
  ap.add_argument("--rows-per-device", type=int, default=0,
                  help="train.global_batch := this x jax's devices (0: the config's)")
  ap.add_argument("--peer", action="store_true", help="also train the model with transformers")
  ap.add_argument("--peer-compile", action="store_true", help="torch.compile the peer's loss")
  ap.add_argument("--peer-mask", choices=PEER_MASKS, default="causal")
  ap.add_argument("--sweep", action="store_true", help="the sizes x lengths x kernels sweep")
  ap.add_argument("--sweep-scale", choices=("full", "tiny"), default="full",
                  help="tiny: every entry shrunk to run on a CPU in seconds")
  ap.add_argument("--run-timeout", type=int, default=3600, help="seconds per sweep entry")
  ap.add_argument("--out", default=None)
  args = ap.parse_args([a for a in argv if not a.startswith("--config.")])
  if args.sweep:
    if overrides:
      ap.error("--sweep sets the model itself; --config.* overrides are for one benchmark")
  args.config = args.config or ("configs/base.py" if args.sweep else "configs/demo/pretrain.py")
  args.steps = args.steps if args.steps is not None else (10 if args.sweep else 20)
  if args.steps < 1:
    ap.error(f"--steps={args.steps}: time at least one step after the first")
  name = "train_sweep" if args.sweep else "train"
  args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{name}.json")
  return args, overrides


def _main(argv: list[str]) -> int:
  args, overrides = parse_args(argv)
  if args.sweep:
    result = sweep(args)
    write_result(args.out, result)
    return 0
  runtime.set_env_defaults()  # jmid.train's GPU flags, before any jax backend starts
  cli.quiet_library_errors()
  result = benchmark(args, overrides)
  for line in summary(result):
    print(line)
  write_result(args.out, result)
  failed = [k for k in ("jmid", "peer") if result[k] is not None and "error" in result[k]]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(cli.run(_main))
