"""Passkey retrieval: prompts of exact lengths with the key at its depth, scoring by greedy
exact match (checked with a reader that finds the key and one that misremembers it), the real
model's predictions on a context axis equal to one device's, the eval in training and the
standalone command on a real checkpoint."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jmid import config as config_lib
from jmid import export, passkey, sharding, train
from jmid import model as model_lib
from jmid.data.tokenizer import ByteTokenizer
from jmid.errors import UserError
from tests.helpers import run_configdict, tiny_configdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()


def test_prompts_have_their_length_and_the_key_at_its_depth():
  for depth in (0.0, 0.5, 1.0):
    s = passkey.make_sample(TOK, 600, depth, seed=7)
    text = TOK.decode(s.tokens)
    assert len(s.tokens) == 601 and text.startswith(passkey.INTRO)
    key = re.search(r"The pass key is (\d{5})\.", text).group(1)
    assert TOK.decode(s.tokens[1:][s.answer]) == f" {key}" and text.endswith(f"is {key}")
    where = text.index("The pass key is") / len(text)
    assert abs(where - depth) < 0.25, (depth, where)
  assert np.array_equal(passkey.make_sample(TOK, 600, 0.5, 7).tokens,
                        passkey.make_sample(TOK, 600, 0.5, 7).tokens)
  with pytest.raises(UserError, match="shorter than the prompt's fixed text"):
    passkey.make_sample(TOK, 100, 0.5, 7)


def _reader(remember: bool):
  """A predictor that reads every next token off the row (as a perfect model would) and, at
  the last position, answers the key's last digit from the needle (or a wrong one)."""
  def predict(inputs):
    out = np.zeros_like(inputs)
    out[:, :-1] = inputs[:, 1:]
    for r, row in enumerate(inputs):
      digit = int(re.search(r"pass key is (\d{5})", TOK.decode(row)).group(1)[-1])
      out[r, -1] = ord(str(digit if remember else (digit + 1) % 10))
    return out
  return predict


def test_retrieval_documents_hide_one_key_that_the_answer_copies(tmp_path):
  from jmid.config import DataConfig, SourceConfig
  from jmid.data import pipeline
  cfg = DataConfig(demo=True, cache_dir=str(tmp_path), sources={"retrieval": SourceConfig("")},
                   seq_len=256, eval_fraction=0.01, packing="first_fit", shuffle=True)
  src = pipeline.open_sources(cfg)  # the optional demo source, built because it is named
  assert src.specs["retrieval"].kind == "chat" and "chat" in src.specs  # the corpus too
  docs = src.train["retrieval"]
  lengths = []
  for i in range(0, len(docs), 97):
    d = docs[i]
    text = TOK.decode(d["tokens"][:-1])
    keys = re.findall(r"pass key(?: is|:) (\d{5})", text)
    assert len(set(keys)) == 1 and text.endswith(f"The pass key is {keys[0]}"), text[-200:]
    assert TOK.decode(d["tokens"][d["mask"] == 0]) == keys[0]  # all trained but the random key
    assert d["tokens"][-1] == TOK.eos_id and d["mask"][-1] == 1
    assert not any(s in text for s in passkey.FILLER.split(". ") if s.strip())
    lengths.append(len(d["tokens"]))
  assert min(lengths) < 200 and 800 < max(lengths) <= 1000  # short ones, and long
  stray = tmp_path / "demo-v2-retrieval-x"  # a folder there that is not ours is never removed
  (tmp_path / "demo-v2-retrieval" / "meta.json").rename(stray)
  with pytest.raises(UserError, match="exists but is incomplete; delete it"):
    pipeline.open_sources(cfg)
  assert sorted(os.listdir(tmp_path / "demo-v2-retrieval")) == ["mask.bin", "offsets.npy",
                                                                 "tokens.bin"]


def test_scoring_is_exact_match_of_every_answer_token():
  args = dict(tok=TOK, lengths=[300, 500], depths=[0.0, 1.0], samples=3, seed=0, rows=4)
  table = passkey.evaluate(_reader(True), **args)
  assert table == {300: {0.0: 1.0, 1.0: 1.0}, 500: {0.0: 1.0, 1.0: 1.0}}
  assert passkey.summary(passkey.evaluate(_reader(False), **args)) == {
      "eval/passkey/300": 0.0, "eval/passkey/500": 0.0}
  assert "depth 0" in passkey.format_table(table)


def test_predictions_on_a_context_axis_equal_one_device():
  c = config_lib.from_configdict(tiny_configdict(vocab_size=258))
  graphdef, _, names = model_lib.abstract_model(c.model)
  params = model_lib.init_params(c.model, 0)
  inputs = np.stack([passkey.make_sample(TOK, 256, d, 1).tokens[:-1] for d in (0.2, 0.8)])
  out = []
  for context, layout in ((1, "zigzag"), (4, "zigzag"), (4, "contiguous")):
    mesh = sharding.make_mesh(config_lib.MeshConfig(1, 2 if context > 1 else 1, 1, context),
                              jax.devices()[:2 * context if context > 1 else 1])
    param_sh = sharding.tree_shardings(mesh, names, params)
    predict = passkey.make_predict(graphdef, param_sh, mesh, layout)
    out.append(predict(jax.device_put(params, param_sh), inputs))
  assert np.array_equal(out[1], out[0]) and np.array_equal(out[2], out[0])


@pytest.mark.slow
def test_passkey_in_training_and_standalone(tmp_path, cache_dir):
  c = run_configdict(tmp_path / "run", cache_dir, steps=3, evals=False)
  c.data.seq_len = 64  # reach: 8 x 64 tokens, room for the prompt (about 230 bytes)
  c.train.passkey_lengths = (256, 320)
  c.train.passkey_depths = (0.0, 1.0)
  c.train.passkey_samples = 1
  train.train(c)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    last = [json.loads(l) for l in f][-1]
  assert 0.0 <= last["eval/passkey/256"] <= 1.0 and "eval/passkey/320" in last

  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  def cmd(*args, workdir=tmp_path / "run"):
    return subprocess.run([sys.executable, "-m", "jmid.passkey", f"--workdir={workdir}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  proc = cmd("--lengths=256,384", "--depths=0,0.5,1", "--samples=1", "--context=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "length | depth 0 | depth 0.5 | depth 1 | mean" in proc.stdout
  with open(tmp_path / "run" / "passkey-3.json") as f:
    record = json.load(f)
  assert set(record["table"]) == {"256", "384"} and "eval/passkey/384" in record

  hf_dir = tmp_path / "hf"  # the same model as a Hugging Face folder: the same table
  export.export(str(tmp_path / "run"), str(hf_dir))
  proc = cmd("--lengths=256,384", "--depths=0,0.5,1", "--samples=1", workdir=hf_dir)
  assert proc.returncode == 2 and "has no tokenizer.json" in proc.stderr.splitlines()[-1]
  proc = cmd("--lengths=256,384", "--depths=0,0.5,1", "--samples=1", "--tokenizer=byte",
             f"--out={tmp_path / 'hf.json'}", workdir=hf_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "hf.json") as f:
    assert json.load(f)["table"] == record["table"]
  for args, expected in [(["--lengths=4096"], "beyond this model's reach (8x its trained "
                           "context of 64 tokens)"),
                         (["--lengths=30"], "must be an integer above the prompt's fixed text"),
                         (["--lengths=258", "--context=2"], "--lengths=258 does not cut into 4")]:
    proc = cmd(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in proc.stderr.strip().splitlines()[-1], proc.stderr
