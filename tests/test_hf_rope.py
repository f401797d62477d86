"""RoPE scalings against transformers' own frequency functions (the independent reference):
linear, llama3 (Llama 3.1) and yarn (Qwen2.5 long context), inverse frequencies and the cos/sin
scale. Needs the `hf` extra (lane 1 of CI installs it)."""

import dataclasses

import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jmid import rope
from tests.helpers import tiny_config

CASES = {
    "linear": (dict(rope_type="linear", factor=4.0), dict(rope_factor=4.0)),
    "llama3": (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192),
               dict(rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_len=8192)),
    "yarn": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
             dict(rope_factor=4.0, rope_original_max_len=32768)),
    "yarn-betas": (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=4096,
                        beta_fast=16.0, beta_slow=2.0, attention_factor=1.3),
                   dict(rope_factor=2.0, rope_original_max_len=4096, rope_beta_fast=16.0,
                        rope_beta_slow=2.0, rope_attention_factor=1.3)),
}


@pytest.mark.parametrize("head_dim,theta", [(64, 500000.0), (128, 1000000.0), (32, 10000.0)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scaled_frequencies_match_transformers(case, head_dim, theta):
  hf_params, ours = CASES[case]
  hf = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                   max_position_embeddings=131072,
                   rope_parameters=dict(rope_theta=theta, **hf_params))
  want_inv, want_scale = ROPE_INIT_FUNCTIONS[hf_params["rope_type"]](hf, "cpu")
  cfg = dataclasses.replace(tiny_config().model, d_model=head_dim * 4, n_heads=4, n_kv_heads=4,
                            head_dim=head_dim, rope_theta=theta,
                            rope_scaling=hf_params["rope_type"], **ours)
  inv, scale = rope.scaled_frequencies(cfg)
  np.testing.assert_allclose(inv, want_inv.numpy(), rtol=2e-6)
  assert scale == pytest.approx(want_scale, rel=1e-6)
  if case != "linear":  # the scalings really change something
    base, _ = rope.scaled_frequencies(dataclasses.replace(cfg, rope_scaling="none"))
    assert not np.allclose(inv, base)
