"""Mid-training Qwen3-8B (base): 50B tokens in 4M-token steps (512 rows of 8192), peak lr 5e-5.

    python -m jmid.train --config=configs/recipes/qwen3_8b.py:node,/models/Qwen3-8B-Base

Targets, with the memory per GPU `jmid.plan` gave (how: common.py):
- h100: refused, one line (see ONE_GPU below)
- node: 8 x H100 (data=1 fsdp=8), 64 microbatches of 1 row per GPU, remat dots:
  44.6 GiB per GPU (params 3.81 GiB + AdamW 7.63 GiB + activations and temporaries)
- pod: 32 x H100 (data=4 fsdp=8), 16 microbatches of 1 row per GPU, remat dots:
  44.6 GiB per GPU (params 3.81 GiB + AdamW 7.63 GiB + activations and temporaries)
"""

from ml_collections import ConfigDict

from configs.recipes.common import Layout, recipe

# Its published config.json (Qwen/Qwen3-8B-Base), the architecture fields
HF_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "hidden_act": "silu", "attention_bias": False,
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": None,
    "use_sliding_window": False, "sliding_window": None}

ONE_GPU = ("8.2B params in f32 with AdamW's two moments are 98 GB, more than one H100 holds; "
           "use node (8 GPUs) or pod")
LAYOUTS = {"h100": ONE_GPU,
           "node": Layout(microbatches=64, remat="dots"),
           "pod": Layout(microbatches=16, remat="dots")}


def get_config(arg: str | None = None) -> ConfigDict:
  return recipe(arg, name="Qwen3-8B-Base", hf_config=HF_CONFIG, seq_len=8192, global_batch=512,
                lr=5e-5, steps=12_000, layouts=LAYOUTS)
