"""Mid-training Qwen3-1.7B (base): 10B tokens in 1M-token steps (128 rows of 8192), peak lr
1e-4.

    python -m jmid.train --config=configs/recipes/qwen3_1_7b.py:h100,/models/Qwen3-1.7B-Base

Targets, with the memory per GPU `jmid.plan` gave (how: common.py):
- h100: 1 x H100 (data=1 fsdp=1), 64 microbatches of 2 rows per GPU, remat dots:
  52.1 GiB per GPU (params 6.41 GiB + AdamW 12.82 GiB + activations and temporaries)
- node: 8 x H100 (data=1 fsdp=8), 4 microbatches of 4 rows per GPU, remat dots:
  42.1 GiB per GPU (params 0.80 GiB + AdamW 1.60 GiB + activations and temporaries)
- pod: 32 x H100 (data=4 fsdp=8), 1 microbatch of 4 rows per GPU, remat dots:
  41.1 GiB per GPU (params 0.80 GiB + AdamW 1.60 GiB + activations and temporaries)
"""

from ml_collections import ConfigDict

from configs.recipes.common import Layout, recipe

# Its published config.json (Qwen/Qwen3-1.7B-Base), the architecture fields
HF_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "hidden_act": "silu", "attention_bias": False,
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": None,
    "use_sliding_window": False, "sliding_window": None}

LAYOUTS = {"h100": Layout(microbatches=64, remat="dots"),
           "node": Layout(microbatches=4, remat="dots"),
           "pod": Layout(microbatches=1, remat="dots")}


def get_config(arg: str | None = None) -> ConfigDict:
  return recipe(arg, name="Qwen3-1.7B-Base", hf_config=HF_CONFIG, seq_len=8192,
                global_batch=128, lr=1e-4, steps=10_000, layouts=LAYOUTS)
