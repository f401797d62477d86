"""What the mid-training recipes share: a Hugging Face base model continued on a math / code /
chat / long-document mixture with a replay of general web text, bf16 compute, the learning rate
warmed up briefly and annealed linearly to 0, laid out for one of three GPU targets.

Each recipe file (llama3_2_1b.py, ...) names its model's published config.json, its batch and
learning rate, and per target the gradient accumulation and remat that `jmid.plan` showed fit,
with the plan's memory per GPU in its docstring: `python -m jmid.plan --config=...:TARGET
--topology=h100:N` with jax 0.10.2 and its CUDA plugin (XLA's compile-only H100s), against the
0.90 share of 80 GB jax takes (71.2 GiB); tests/test_plan.py re-checks two of the figures. Its argument is `TARGET[,MODEL_DIR]`:

    python -m jmid.plan  --config=configs/recipes/llama3_2_1b.py:h100 --topology=h100:1
    python -m jmid.train --config=configs/recipes/llama3_2_1b.py:h100,/models/Llama-3.2-1B

MODEL_DIR (default: models/<name>) is the Hugging Face folder the run starts from; its
config.json must match the recipe's (train checks every model.* field against it) and its
tokenizer.json tokenizes the data. The sources are JSON lines under data/midtrain/<source>/
(point `--config.data.sources.<source>.path` elsewhere, or link the folder); the weights are
token shares in the spirit of OLMo 2's and SmolLM3's mid-training mixtures: a starting point,
not a tuned mixture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict

from configs import base
from jmid import hf
from jmid.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one target runs a recipe: the global batch is cut into `microbatches` passes per
  step (gradient accumulation), and `remat` is what the backward pass keeps."""

  microbatches: int
  remat: str


# target -> H100s (80 GB): one GPU, one node (NVLink), four nodes over InfiniBand. The mesh is
# fsdp over the GPUs of a node and data parallel across nodes (mesh.dcn_data: every node).
TARGETS = {"h100": 1, "node": 8, "pod": 32}
GPUS_PER_NODE = 8

# source -> (weight as a token share, kind)
MIXTURE = {"web": (0.35, "text"), "math": (0.20, "text"), "code": (0.20, "text"),
           "chat": (0.15, "chat"), "long": (0.10, "text")}


def recipe(arg: str | None, *, name: str, hf_config: dict[str, Any], seq_len: int,
           global_batch: int, lr: float, steps: int,
           layouts: dict[str, Layout | str]) -> ConfigDict:
  """The config for `arg` = TARGET[,MODEL_DIR]; a target the model cannot use is one line
  saying why (the str in `layouts`)."""
  target, _, folder = (arg or "").partition(",")
  if target not in TARGETS:
    raise ConfigError(f"recipe {name}: target {target!r} is not one of {', '.join(TARGETS)}; "
                      f"e.g. --config=configs/recipes/<file>.py:{next(iter(TARGETS))}")
  layout = layouts[target]
  if isinstance(layout, str):
    raise ConfigError(f"recipe {name}: target {target}: {layout}")
  folder = folder or f"models/{name}"
  gpus = TARGETS[target]

  c = base.get_config()
  c.run.workdir = f"runs/mid-{name}-{target}"
  c.run.name = f"mid-{name}"
  for k, v in hf.model_fields(hf_config).items():
    setattr(c.model, k, v)
  c.init.from_path = folder
  c.init.load = "params"
  c.model.compute_dtype = "bfloat16"
  c.model.param_dtype = "float32"  # AdamW updates params in f32; matmuls read them in bf16
  c.model.attention = "auto"  # cuDNN on Hopper with packed documents as offsets
  c.model.remat = layout.remat
  c.mesh.fsdp = min(gpus, GPUS_PER_NODE)
  c.mesh.data = 1  # and mesh.dcn_data = 0: data parallel over every node

  c.data.tokenizer = f"{folder}/tokenizer.json"
  c.data.seq_len = seq_len
  c.data.packing = "concat"
  c.data.sources = ConfigDict({
      s: ConfigDict({"path": f"data/midtrain/{s}/*.jsonl", "format": "jsonl", "kind": kind,
                     "weight": w})
      for s, (w, kind) in MIXTURE.items()})

  c.optim.lr = lr
  c.optim.end_lr = 0.0
  c.optim.schedule = "linear"  # annealed to 0 over the run: the mid-training anneal
  c.optim.warmup_steps = min(200, steps // 20)
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0

  c.train.steps = steps
  c.train.global_batch = global_batch
  c.train.microbatches = layout.microbatches
  c.train.log_every_steps = 10
  c.train.eval_every_steps = 500
  c.train.checkpoint_every_steps = 500
  return c
