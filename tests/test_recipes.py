"""The mid-training recipes: each target validates or is refused in one line, and each recipe's
model is its Hugging Face model (transformers builds the same parameter count from the
recipe's config.json; no weights needed). Their plan memory is checked in test_plan.py."""

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from configs.recipes import common
from jmid import config as config_lib
from jmid import hf, model
from jmid.errors import ConfigError

RECIPES = ["llama3_2_1b", "llama3_1_8b", "qwen3_1_7b", "qwen3_8b"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_targets_validate_and_its_model_is_the_hf_one(name):
  import torch
  import transformers
  r = importlib.import_module(f"configs.recipes.{name}")
  for target in common.TARGETS:
    if isinstance(r.LAYOUTS[target], str):
      with pytest.raises(ConfigError, match=f"target {target}: .*GB"):
        r.get_config(target)
      continue
    c = config_lib.from_configdict(r.get_config(f"{target},/models/x"))
    assert c.model.compute_dtype == "bfloat16" and c.optim.end_lr == 0.0
    assert c.init.from_path == "/models/x" and c.data.tokenizer == "/models/x/tokenizer.json"
    rows = c.train.global_batch // c.train.microbatches // common.TARGETS[target]
    assert rows >= 1 and rows * c.train.microbatches * common.TARGETS[target] == \
        c.train.global_batch
  assert not hf.contradictions(c.model, r.HF_CONFIG)

  kind = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}[r.HF_CONFIG["architectures"][0]]
  hf_cfg = transformers.AutoConfig.for_model(kind, **r.HF_CONFIG)
  with torch.device("meta"):
    theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_cfg)
                 .parameters())
  _, params, _ = model.abstract_model(c.model)
  assert model.count_params(params) == theirs, (name, theirs)
  jax.clear_caches()


def test_a_recipe_target_is_one_line_through_the_cli(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jmid.train",
                         "--config=configs/recipes/llama3_1_8b.py:h100"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert "more than one H100 holds; use node (8 GPUs) or pod" in lines[0]


@pytest.mark.slow
def test_a_recipe_trains_end_to_end_from_a_hf_folder_at_a_tiny_size(tmp_path):
  """Qwen3-1.7B's recipe with its widths shrunk (the folder built by transformers from the
  recipe's config.json, shrunk the same way): its mixture of JSON-lines sources (chat among
  them) through the folder's tokenizer, bf16 compute, the anneal to 0, from the folder's
  weights; the CLI as a user runs it, from the folder the data sits in."""
  import transformers
  from configs.recipes import qwen3_1_7b
  from tests.bpe import sentences, train_bpe
  small = {"vocab_size": 384, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "intermediate_size": 128}
  folder = tmp_path / "Qwen3-tiny"
  hf_cfg = transformers.AutoConfig.for_model("qwen3", **{**qwen3_1_7b.HF_CONFIG, **small})
  transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(folder)
  train_bpe(str(folder / "tokenizer.json"))
  text = sentences(600)
  for i, source in enumerate(common.MIXTURE):
    d = tmp_path / "data" / "midtrain" / source
    d.mkdir(parents=True)
    rows = ([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(text[::2], text[1::2])] if source == "chat" else
            [{"text": " ".join(text[j:j + 4 * (i + 1)])} for j in range(0, 600, 3)])
    (d / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  fields = hf.model_fields(hf_cfg.to_dict())
  overrides = [f"--config.model.{k}={fields[k]}" for k in
               ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff")]
  overrides += ["--config.data.seq_len=64", "--config.train.global_batch=8",
                "--config.train.microbatches=2", "--config.train.steps=6",
                "--config.optim.warmup_steps=1", "--config.train.log_every_steps=1",
                "--config.train.eval_batches=1",
                f"--config.data.cache_dir={tmp_path / 'cache'}"]
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": ROOT,
         "JAX_PLATFORMS": "cpu"}  # one CPU device, as the h100 target's mesh has one
  proc = subprocess.run([sys.executable, "-m", "jmid.train",
                         f"--config={ROOT}/configs/recipes/qwen3_1_7b.py:h100,{folder}",
                         *overrides], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"params from {folder}" in proc.stdout and "attention xla" in proc.stdout, proc.stdout
  logged = [json.loads(l) for l in
            (tmp_path / "runs" / "mid-Qwen3-1.7B-Base-h100" / "metrics.jsonl").read_text()
            .splitlines()]
  steps = [m for m in logged if "loss" in m]
  assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
  assert all(math.isfinite(m["loss"]) for m in steps) and steps[0]["mix/chat"] > 0
  assert steps[-1]["lr"] < steps[1]["lr"]  # annealing to 0
