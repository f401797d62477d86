"""The peer of benchmarks/train.py: the same model and batch rows trained by PyTorch +
transformers on one device (the Hugging Face class jmid exports to, SDPA attention, AdamW with
jmid's hyperparameters). Apart from train.py so the core reads without torch; torch and
transformers are imported only when the peer runs. train.py's docstring says what is fair."""

from __future__ import annotations

import dataclasses
import gc
import types
from typing import Any

import jax
import numpy as np

from benchmarks.train_common import Result, throughput, timed
from jmid import config as config_lib
from jmid import families, metrics

PEER_MASKS = ("causal", "documents")
_CAUSAL_SDPA = "sdpa_causal"  # transformers' SDPA forward under a name no mask builder knows
PEER_NOTES = {
    "causal": "the peer's SDPA uses a plain causal mask, so the documents of a row are not "
              "isolated from each other (jmid isolates them); this favours the peer slightly",
    "documents": "the peer's SDPA gets the block-diagonal causal mask transformers builds from "
                 "the restarting position_ids (documents isolated as in jmid), materialised",
}


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
  hf = transformers.AutoConfig.for_model(
      **families.hf_config(dataclasses.asdict(c.model), c.data.seq_len, "float32"))
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


def peer_problem() -> str | None:
  """Why the peer should not run: jax on an accelerator, torch on the CPU (a CPU build)."""
  if torch_device() == "cuda":
    return None
  platform = jax.devices()[0].platform
  if platform == "cpu":
    return None
  return (f"torch sees no CUDA device (a CPU build of torch?) while jax runs on {platform}; "
          "the peer would train on the CPU")

