"""Mid-training Llama-3.1-8B: 50B tokens in 4M-token steps (512 rows of 8192), peak lr 5e-5.

    python -m jmid.train --config=configs/recipes/llama3_1_8b.py:node,/models/Llama-3.1-8B

Targets, with the memory per GPU `jmid.plan` gave (how: common.py):
- h100: refused, one line (see ONE_GPU below)
- node: 8 x H100 (data=1 fsdp=8), 64 microbatches of 1 row per GPU, remat dots:
  45.2 GiB per GPU (params 3.74 GiB + AdamW 7.48 GiB + activations and temporaries)
- pod: 32 x H100 (data=4 fsdp=8), 16 microbatches of 1 row per GPU, remat dots:
  43.3 GiB per GPU (params 3.74 GiB + AdamW 7.48 GiB + activations and temporaries)
"""

from ml_collections import ConfigDict

from configs.recipes.common import Layout, recipe

# Its published config.json (meta-llama/Llama-3.1-8B), the architecture fields
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}

ONE_GPU = ("8B params in f32 with AdamW's two moments are 96 GB, more than one H100 holds; "
           "use node (8 GPUs) or pod")
LAYOUTS = {"h100": ONE_GPU,
           "node": Layout(microbatches=64, remat="dots"),
           "pod": Layout(microbatches=16, remat="dots")}


def get_config(arg: str | None = None) -> ConfigDict:
  return recipe(arg, name="Llama-3.1-8B", hf_config=HF_CONFIG, seq_len=8192, global_batch=512,
                lr=5e-5, steps=12_000, layouts=LAYOUTS)
