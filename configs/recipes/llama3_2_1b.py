"""Mid-training Llama-3.2-1B: 10B tokens in 1M-token steps (128 rows of 8192), peak lr 1e-4.

    python -m jmid.train --config=configs/recipes/llama3_2_1b.py:h100,/models/Llama-3.2-1B

Targets, with the memory per GPU `jmid.plan` gave (how: common.py):
- h100: 1 x H100 (data=1 fsdp=1), 32 microbatches of 4 rows per GPU, remat dots:
  50.0 GiB per GPU (params 4.60 GiB + AdamW 9.21 GiB + activations and temporaries)
- node: 8 x H100 (data=1 fsdp=8), 4 microbatches of 4 rows per GPU, remat dots:
  30.1 GiB per GPU (params 0.58 GiB + AdamW 1.15 GiB + activations and temporaries)
- pod: 32 x H100 (data=4 fsdp=8), 1 microbatch of 4 rows per GPU, remat dots:
  28.4 GiB per GPU (params 0.58 GiB + AdamW 1.15 GiB + activations and temporaries)
"""

from ml_collections import ConfigDict

from configs.recipes.common import Layout, recipe

# Its published config.json (meta-llama/Llama-3.2-1B), the architecture fields
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}

LAYOUTS = {"h100": Layout(microbatches=32, remat="dots"),
           "node": Layout(microbatches=4, remat="dots"),
           "pod": Layout(microbatches=1, remat="dots")}


def get_config(arg: str | None = None) -> ConfigDict:
  return recipe(arg, name="Llama-3.2-1B", hf_config=HF_CONFIG, seq_len=8192, global_batch=128,
                lr=1e-4, steps=10_000, layouts=LAYOUTS)
