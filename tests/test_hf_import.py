"""Hugging Face import: tiny random models built locally with transformers, saved as
safetensors (single and sharded), loaded by jmid: logits match transformers' within 1e-4.
Needs the `hf` extra."""

import json

import numpy as np
import pytest
import torch
import transformers

from jmid import hf
from jmid.errors import UserError

BASE = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512,
            rms_norm_eps=1e-6)
CASES = {
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama-tied-linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                       factor=2.0))),
    "qwen2-bias-yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=True, rope_parameters=dict(
            rope_type="yarn", rope_theta=1000000.0, factor=4.0,
            original_max_position_embeddings=128))),
    "qwen3-qknorm-headdim": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=32, tie_word_embeddings=False, rope_parameters=dict(rope_type="default",
                                                                     rope_theta=1000000.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        sliding_window=None, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(
        sliding_window=8, tie_word_embeddings=False,  # much shorter than the test's 48 tokens
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # the families of layer patterns: each deeper than one group of its pattern, with layers
    # past the last whole group, windows shorter than the tokens, softcaps that bite
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=32,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"], tie_word_embeddings=True,
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                rope_theta=1000000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters=dict(rope_type="default",
                                                        rope_theta=500000.0))),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        num_hidden_layers=5, sliding_window=8, tie_word_embeddings=False,
        rope_parameters={"full_attention": dict(rope_type="yarn", factor=4.0,
                                                original_max_position_embeddings=64,
                                                rope_theta=500000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=500000.0)})),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        num_hidden_layers=5, tie_word_embeddings=True, pad_token_id=0,
        rope_parameters=dict(rope_type="default", rope_theta=2000000.0))),
}


def build(case, path, shard=None, **overrides):
  """A random HF model saved to `path`; returns it (float32, eval mode)."""
  config_cls, model_cls, extra = CASES[case]
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():  # weights large enough that a layout slip changes the logits
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
  model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  model = build(case, tmp_path)
  tokens = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 48))
  ours = np.asarray(hf.load(str(tmp_path))(tokens))
  want = _hf_logits(model, tokens)
  assert np.abs(want).max() > 1.0  # a real signal, not near-zero logits
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_sharded_safetensors_import(tmp_path):
  model = build("qwen3-qknorm-headdim", tmp_path, shard="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
  tokens = np.arange(40).reshape(2, 20)
  np.testing.assert_allclose(np.asarray(hf.load(str(tmp_path))(tokens)),
                             _hf_logits(model, tokens), atol=1e-4, rtol=0)


def _edit_config(folder, **changes):
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_unsupported_architecture_is_named(tmp_path):
  build("llama-llama3", tmp_path)
  _edit_config(tmp_path, architectures=["GPT2LMHeadModel"])
  with pytest.raises(UserError, match="GPT2LMHeadModel is not supported; jmid reads "
                                      "Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM"):
    hf.load(str(tmp_path))


def test_config_that_contradicts_the_tensors(tmp_path):
  build("mistral", tmp_path)
  _edit_config(tmp_path, intermediate_size=128)
  with pytest.raises(UserError,
                     match=r"mlp\.\w+_proj\.weight has shape .* contradicts config.json"):
    hf.load(str(tmp_path))


def test_missing_tensors_are_named(tmp_path):
  build("qwen3-qknorm-headdim", tmp_path)
  _edit_config(tmp_path, num_hidden_layers=3)
  with pytest.raises(UserError, match="missing tensors model.layers.2"):
    hf.load(str(tmp_path))


def test_a_run_starts_from_a_hf_folder(tmp_path):
  """init.from_path=<HF folder>: the run's first checkpoint holds the HF weights (sharded over
  the 8 fake devices), and a model.* that contradicts config.json is one clear error."""
  from jmid import checkpoint as ckpt_lib
  from jmid import model as model_lib
  from jmid import train
  from tests.helpers import tiny_configdict
  model = build("llama-llama3", tmp_path / "hf", vocab_size=384)  # demo byte tokens need 258
  c = hf.set_model(tiny_configdict(), str(tmp_path / "hf"))
  c.run.workdir, c.data.cache_dir = str(tmp_path / "run"), str(tmp_path / "cache")
  c.train.steps, c.mesh.fsdp, c.mesh.tensor = 0, 4, 2
  train.train(c)
  meta = ckpt_lib.read_meta(str(tmp_path / "run" / "checkpoints" / "0"))
  # a Hugging Face start is its own kind of origin: the folder and its architecture, no run
  from jmid.checkpoint.meta import Origin
  assert meta.lineage[0] == Origin(str(tmp_path / "hf"), "params",
                                   architecture="LlamaForCausalLM")
  import orbax.checkpoint as ocp
  params = ocp.PyTreeCheckpointer().restore(str(tmp_path / "run" / "checkpoints" / "0" /
                                                "state"))["params"]
  from jmid import config as config_lib
  graphdef, _, _ = model_lib.abstract_model(config_lib.from_configdict(c).model)
  tokens = np.arange(64).reshape(2, 32) * 5
  np.testing.assert_allclose(np.asarray(model_lib.apply(graphdef, params, tokens)),
                             _hf_logits(model, tokens), atol=1e-4, rtol=0)
  c.run.workdir, c.model.d_ff = str(tmp_path / "run2"), 128
  with pytest.raises(UserError, match=r"contradicts its config.json: model.d_ff=128 "
                                      r"\(config.json: 96\)"):
    train.train(c)


def test_transformers_4_rope_keys(tmp_path):
  """config.json written the transformers 4 way (rope_theta + rope_scaling with 'type')."""
  model = build("llama-llama3", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  params = cfg.pop("rope_parameters")
  cfg["rope_theta"] = params.pop("rope_theta")
  cfg["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in params.items()}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  assert hf.model_fields(cfg)["rope_scaling"] == "llama3"
  tokens = np.arange(60).reshape(2, 30)
  np.testing.assert_allclose(np.asarray(hf.load(str(tmp_path))(tokens)),
                             _hf_logits(model, tokens), atol=1e-4, rtol=0)
