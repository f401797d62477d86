"""The checkpoint meta as typed values (jmid/checkpoint/meta.py): a round trip through JSON, a
meta as version 1 of jmid wrote it (no version, the model spec twice, a Hugging Face origin as
an 'hf:' run name) read into today's types, and a newer version refused in one line."""

import json

import pytest

from jmid.checkpoint.meta import VERSION, Meta, Origin
from jmid.errors import UserError

MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "family": "qwen3"}
CONFIG = {"run": {"name": "stage-two"}, "data": {"seq_len": 4096, "tokenizer": "/t.json"},
          "optim": {"lr": 3e-4}}


def test_a_meta_round_trips_through_json_with_the_model_stored_once():
  meta = Meta(step=6, tokens=1536, lr=1.5e-4, model=MODEL, config={**CONFIG, "model": MODEL},
              lineage=(Origin("/runs/one/checkpoints/9", "params", 9, 2304, 3e-4, "stage-one"),
                       Origin("/models/Qwen3", "params", architecture="Qwen3ForCausalLM")),
              ema=True, fingerprints={"params.embed": [1, 2]})
  raw = json.loads(json.dumps(meta.to_json()))
  assert raw["version"] == VERSION and "model" not in raw["config"]
  back = Meta.from_json(raw)
  assert back == Meta(**{**meta.__dict__, "config": CONFIG})
  assert back.full_config() == {**CONFIG, "model": MODEL}
  assert (back.run_name, back.seq_len, back.tokenizer, back.config_lr) == (
      "stage-two", 4096, "/t.json", 3e-4)
  assert back.origin("/runs/two/checkpoints/6", "ema") == Origin(
      "/runs/two/checkpoints/6", "ema", 6, 1536, 1.5e-4, "stage-two")


def test_a_version_1_meta_reads_into_todays_types():
  old = {"step": 3, "tokens": 768, "lr": 2e-4, "model": MODEL,
         "config": {**CONFIG, "model": MODEL}, "ema": False,
         "lineage": [{"from": "/models/Qwen3", "load": "params", "step": None, "tokens": None,
                      "lr": None, "run": "hf:Qwen3ForCausalLM"}],
         "fingerprints": {"params.blocks.wq": [3, 4]}}
  meta = Meta.from_json(old)
  assert meta.version == 1 and meta.model == MODEL and "model" not in meta.config
  assert meta.lineage == (Origin("/models/Qwen3", "params", architecture="Qwen3ForCausalLM"),)
  assert Meta.from_json({}).empty and not meta.empty


def test_a_meta_from_a_newer_jmid_is_one_line():
  with pytest.raises(UserError, match=r"ckpt: meta version 99 was written by a newer jmid "
                                      r"\(this one reads up to 2\); upgrade jmid"):
    Meta.from_json({"version": 99, "step": 1}, "ckpt")
