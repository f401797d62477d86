"""Export: a jmid checkpoint -> a Hugging Face folder that transformers loads with the same
logits; import then export gives back the same tensors bit for bit. Needs the `hf` extra."""

import dataclasses
import json
import struct

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jmid import checkpoint as ckpt_lib
from jmid import config as config_lib
from jmid import export, hf, train
from jmid import model as model_lib
from tests.helpers import tiny_configdict
from tests.test_hf_import import CASES, build


def _run_from(hf_dir, workdir, steps):
  c = hf.set_model(tiny_configdict(), str(hf_dir))
  c.run.workdir, c.data.cache_dir = str(workdir), str(workdir.parent / "cache")
  c.train.steps, c.train.eval_every_steps, c.optim.lr = steps, 0, 1e-2
  train.train(c)
  return c


def _tensors(folder):
  out = {}
  for f in sorted(folder.glob("*.safetensors")):
    out.update(load_file(str(f)))
  return out


# the newer families' CLI runs in the slow lane, Gemma 3 (the most switches) in both; their
# import then save in the fast lane (test_python_api_round_trip)
NEW_FAMILIES = ("gemma2", "olmo2", "olmo3", "smollm3")


def _slow_if_new(cases):
  return [pytest.param(c, marks=pytest.mark.slow) if c in NEW_FAMILIES else c for c in cases]


@pytest.mark.parametrize("case", _slow_if_new(sorted(CASES)))
def test_import_then_export_gives_back_the_same_tensors(case, tmp_path):
  build(case, tmp_path / "hf", vocab_size=384)
  _run_from(tmp_path / "hf", tmp_path / "run", steps=0)
  assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}"]) == 0
  a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["architectures"] == [CASES[case][1]]
  rope = CASES[case][2]["rope_parameters"]
  rope, ours = (rope.get("full_attention", rope),
                cfg["rope_parameters"].get("full_attention", cfg["rope_parameters"]))
  assert ours["rope_type"] == rope["rope_type"]


@pytest.mark.parametrize("case", _slow_if_new(sorted(CASES)))
def test_trained_export_loads_in_transformers_with_the_same_logits(case, tmp_path):
  build(case, tmp_path / "hf", vocab_size=384)
  c = _run_from(tmp_path / "hf", tmp_path / "run", steps=3)
  step_dir = tmp_path / "run" / "checkpoints" / "3"
  params = ocp.PyTreeCheckpointer().restore(str(step_dir / "state"))["params"]
  graphdef, _, _ = model_lib.abstract_model(config_lib.from_configdict(c).model)
  tokens = np.random.default_rng(1).integers(0, 384, (2, 40))
  ours = np.asarray(model_lib.apply(graphdef, params, tokens))
  assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}",
                      "--shard-mb=0.2"]) == 0
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.float().numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  with torch.no_grad():
    out = model.generate(torch.tensor(tokens[:1, :8]), max_new_tokens=5, do_sample=False)
  assert out.shape == (1, 13)
  if case != "llama-llama3":
    return
  # bf16: the same model to bfloat16 rounding
  assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'bf16'}",
                      "--dtype=bfloat16"]) == 0
  assert _header_dtypes(tmp_path / "bf16") == {"BF16"}
  m16 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"),
                                                          dtype=torch.float32).eval()
  with torch.no_grad():
    low = m16(torch.tensor(tokens)).logits.float().numpy()
  assert np.abs(low - ours).max() < 0.05 * np.abs(ours).max()


def _header_dtypes(folder):
  """The dtype names in the safetensors headers, as a reader sees them."""
  out = set()
  for f in folder.glob("*.safetensors"):
    with open(f, "rb") as fh:
      (n,) = struct.unpack("<Q", fh.read(8))
      header = json.loads(fh.read(n))
    out |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
  return out


def test_export_of_a_path_that_is_not_a_checkpoint(tmp_path, capsys):
  assert export.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}"]) == 2
  assert "not a jmid workdir" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["qwen2-bias-yarn", *NEW_FAMILIES])
def test_python_api_round_trip(case, tmp_path):
  """jmid.hf.load then jmid.hf.save: the same tensors, and transformers' logits unchanged."""
  model = build(case, tmp_path / "hf")
  hf.save(hf.load(str(tmp_path / "hf")), str(tmp_path / "out"))
  a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  tokens = torch.arange(30).reshape(1, 30)
  with torch.no_grad():
    np.testing.assert_array_equal(again(tokens).logits.numpy(), model(tokens).logits.numpy())


def test_export_carries_the_runs_tokenizer(tmp_path):
  """A run that names a tokenizer.json hands it on: transformers loads it from the export."""
  from tests.bpe import train_bpe
  tok = train_bpe(str(tmp_path / "tokenizer.json"))
  build("mistral", tmp_path / "hf")
  m = hf.load(str(tmp_path / "hf"))
  leaves = ((".".join(str(getattr(k, "key", k)) for k in p), np.asarray(x))
            for p, x in jax.tree_util.tree_flatten_with_path(m.params)[0])
  meta = ckpt_lib.Meta(model=dataclasses.asdict(m.cfg), config={"data": {"tokenizer": tok}})
  export.write_hf(str(tmp_path / "out"), meta, leaves)
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert loaded("the cat sat")["input_ids"]
