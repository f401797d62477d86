"""python -m jmid.plan: the train step compiled ahead of time for a target, nothing allocated;
its figures are the compiled step's own memory analysis, and a step that cannot fit is exit 3.
"""

import importlib
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from jmid import build, configfile, gpus, plan, sharding
from jmid import config as config_lib

DEMO = "--config=configs/demo/pretrain.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_of_the_demo_on_local_devices_is_the_compiled_steps_memory(tmp_path, capsys):
  out = tmp_path / "plan.json"
  assert plan.main([DEMO, "--config.mesh.fsdp=4", "--config.mesh.data=2",
                    f"--json={out}"]) == 0
  got = json.loads(out.read_text())
  text = capsys.readouterr().out
  assert "fits" in text and "mesh data=2 fsdp=4 tensor=1 context=1" in text
  c = config_lib.from_configdict(configfile.parse(
      ["plan", DEMO, "--config.mesh.fsdp=4", "--config.mesh.data=2"]))
  mesh = sharding.make_mesh(c.mesh)
  su = build.setup(c, mesh)
  m = plan.compile_train_step(c, su.train_step, su.abstract_state, su.batch_sh
                              ).memory_analysis()
  assert (got["argument_bytes"], got["output_bytes"], got["temp_bytes"], got["alias_bytes"]) == (
      m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
      m.alias_size_in_bytes)
  assert got["per_device_bytes"] == (m.argument_size_in_bytes + m.output_size_in_bytes
                                     + m.temp_size_in_bytes - m.alias_size_in_bytes)
  # params and AdamW's two moments, f32, a quarter of each on a device (fsdp=4)
  n_params = sum(a.size for a in jax.tree.leaves(su.abstract_state["params"]))
  assert got["params_bytes"] == pytest.approx(4 * n_params / 4, rel=0.02)
  assert got["optimizer_bytes"] == pytest.approx(2 * got["params_bytes"], rel=0.01)
  assert got["fits"] is True and got["hbm_bytes"] > got["per_device_bytes"]
  assert got["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "context": 1}
  assert got["device_kind"] == "cpu" and got["compile_seconds"] > 0
  assert got["model_flops_per_step"] > 0 and got["flops_per_step"] > 0


EIGHT_B = ["--config.model.d_model=4096", "--config.model.n_layers=32",
           "--config.model.n_heads=32", "--config.model.n_kv_heads=8",
           "--config.model.d_ff=14336", "--config.model.vocab_size=128256",
           "--config.data.seq_len=1024", "--config.train.global_batch=8"]


def test_an_8b_shape_that_cannot_fit_is_exit_3_with_what_to_change(capsys):
  assert plan.main([DEMO, *EIGHT_B]) == 3
  out = capsys.readouterr().out
  assert "DOES NOT FIT" in out and "jmid plan: try " in out and "model.remat" in out


def test_a_tpu_slice_compiles_the_pallas_step_and_refuses_an_8b_shape(tmp_path, capfd):
  """libtpu's compile-only v5e:2x2 on this CPU: the demo with our Mosaic kernel (per device in
  shard_map: Mosaic cannot be partitioned) fits a chip's 16 GiB; an 8B shape does not, which
  the TPU compiler itself says, with its numbers."""
  out = tmp_path / "tpu.json"
  tpu = ["--topology=v5e:2x2", "--config.model.attention=pallas", "--config.mesh.fsdp=4"]
  assert plan.main([DEMO, *tpu, f"--json={out}"]) == 0
  got = json.loads(out.read_text())
  assert got["device_kind"] == "TPU v5 lite" and got["hbm_bytes"] == 16 * 2**30
  assert got["fits"] is True and got["mesh"]["fsdp"] == 4
  assert capfd.readouterr().err == ""  # libtpu's warnings about a host without TPUs dropped
  assert plan.main([DEMO, *tpu, *EIGHT_B, f"--json={out}"]) == 3
  got = json.loads(out.read_text())
  assert got["fits"] is False and got["temp_bytes"] > got["hbm_bytes"] > 15 * 2**30
  assert "the compiler refused it" in capfd.readouterr().out
  # two slices joined over DCN: the data axis crosses them, fsdp stays inside each slice
  assert plan.main([DEMO, "--topology=v5e:2x2", "--slices=2", "--config.mesh.fsdp=-1",
                    f"--json={out}"]) == 0
  got = json.loads(out.read_text())
  assert got["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "context": 1}
  assert "x 2 slices over DCN" in got["devices"]


def test_the_model_flops_formula_agrees_with_xla_within_5_percent():
  """jmid's formula (6 x matmul params + causal attention; what MFU divides by) against XLA's
  count of the compiled step, layers unrolled (XLA counts a scanned body once); XLA also
  counts norms, softmax and the optimizer, and attention's masked half: it runs ~3% above."""
  for d, layers, heads, kv, ff, seq, vocab in ((512, 4, 8, 8, 1536, 128, 384),
                                               (768, 2, 12, 4, 2048, 256, 384),
                                               (1024, 2, 8, 2, 4096, 512, 4096)):
    cd = configfile.parse(["plan", DEMO, "--config.train.global_batch=4"])
    cd.model.update(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff=ff,
                    vocab_size=vocab, scan_layers=False)
    cd.data.seq_len = seq
    c = config_lib.from_configdict(cd)
    p = plan.make_plan(c, plan.Target(jax.devices()[:1], "1 cpu device"))
    assert p.flops_per_step == pytest.approx(p.model_flops_per_step, rel=0.05), (d, layers)


@pytest.mark.skipif(gpus.cuda_plugin() is not None, reason="jax's CUDA plugin is installed: "
                    "GPU targets are compile-only, not estimated (the test below)")
def test_a_gpu_target_is_an_estimate_on_cpu_stand_ins(tmp_path, capsys, monkeypatch):
  """Without jax's CUDA plugin h100:N compiles for N CPU stand-ins of the same mesh and says
  so, against the share of the GPU's memory jax will use. A fresh process makes as many
  stand-ins as named; one whose CPU backend has started uses what it has, or says so."""
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  out = tmp_path / "gpu.json"
  assert plan.main([DEMO, "--topology=h100:4", f"--json={out}"]) == 0
  got = json.loads(out.read_text())
  assert got["estimate"] is True and got["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert got["hbm_bytes"] == int(0.9 * 84942979072) and got["mesh"]["fsdp"] == 4
  assert "an ESTIMATE from CPU stand-ins" in capsys.readouterr().out
  assert plan.main([DEMO, "--topology=h200:64"]) == 2
  assert "run jmid.plan in a fresh process" in capsys.readouterr().err
  # no JAX_PLATFORMS: with libtpu installed (the test extra) on a host without TPUs, the CLI
  # goes to the CPU without libtpu's screens of warnings
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  proc = subprocess.run([sys.executable, "-m", "jmid.plan", DEMO, "--topology=h200:16"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  # two nodes of 8: data parallel across them (mesh.dcn_data=0), fsdp over the 8 inside
  assert "16 x NVIDIA H200 in 2 nodes, an ESTIMATE" in proc.stdout, proc.stdout
  assert "data=2 fsdp=8" in proc.stdout
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9x")
  assert plan.main([DEMO, "--topology=h100:4"]) == 2
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=.9x: must be a fraction in (0, 1]" in \
      capsys.readouterr().err


NEEDS_CUDA_PLUGIN = pytest.mark.skipif(
    gpus.cuda_plugin() is None and not os.environ.get("JMID_NEED_CUDA_PLUGIN"),
    reason="jax's CUDA plugin is not installed (.ci/run installs it for this test)")


@NEEDS_CUDA_PLUGIN
def test_a_gpu_target_is_xlas_own_gpu_program_with_the_cuda_plugin(tmp_path, capfd, monkeypatch):
  """With jax's CUDA plugin on this GPU-less host h100:16 is XLA's compile-only CUDA devices
  in 2 nodes of 8 (process_index is the node, so data parallel crosses them): the step is
  compiled for sm_90a, our Pallas kernel through Triton, and the plan is XLA's GPU memory and
  FLOPs, against 90% of the GPU (jmid's default share); an 8B shape on one GPU does not fit."""
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  t = plan.target("h100:16")
  assert {d.platform for d in t.devices} == {"gpu"} and not t.estimate
  assert [d.process_index for d in t.devices] == [0] * 8 + [1] * 8
  c = config_lib.from_configdict(configfile.parse(
      ["plan", DEMO, "--config.model.attention=pallas", "--config.model.n_layers=1"]))
  mesh = sharding.make_mesh(c.mesh, t.devices, t.granule_of)
  su = build.setup(c, mesh)
  hlo = plan.compile_train_step(c, su.train_step, su.abstract_state, su.batch_sh).as_text()
  assert "__gpu$xla.gpu.triton" in hlo and "cuda" in hlo.lower()
  out = tmp_path / "gpu.json"
  assert plan.main([DEMO, "--topology=h100:16", "--config.model.attention=pallas",
                    f"--json={out}"]) == 0
  got = json.loads(out.read_text())
  assert got["estimate"] is False and got["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert got["mesh"] == {"data": 2, "fsdp": 8, "tensor": 1, "context": 1}
  assert got["hbm_bytes"] == int(0.9 * 84942979072) and got["flops_per_step"] > 0
  assert "(compile-only)" in capfd.readouterr().out
  assert plan.main([DEMO, "--topology=h100:1", *EIGHT_B]) == 3
  assert "DOES NOT FIT" in capfd.readouterr().out


@NEEDS_CUDA_PLUGIN
@pytest.mark.parametrize("recipe", ["llama3_2_1b", "qwen3_1_7b"])
def test_a_recipes_memory_is_what_its_plan_says_with_the_cuda_plugin(recipe, tmp_path,
                                                                    monkeypatch):
  """The per-GPU memory a recipe's docstring states for one H100 is the exact plan's (to 0.1
  GiB): a changed layout, model or compiler shows here."""
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  doc = importlib.import_module(f"configs.recipes.{recipe}").__doc__
  stated = float(re.search(r"- h100: .*\n  ([\d.]+) GiB per GPU", doc).group(1))
  out = tmp_path / "plan.json"
  assert plan.main([f"--config=configs/recipes/{recipe}.py:h100", "--topology=h100:1",
                    f"--json={out}"]) == 0
  got = json.loads(out.read_text())
  assert not got["estimate"] and abs(got["per_device_bytes"] / 2**30 - stated) <= 0.05, got


@pytest.mark.parametrize("topology", ["h100", "v9z:2x2", "v5e", "h100:12"])
def test_an_unknown_target_is_one_line(topology, capsys):
  assert plan.main([DEMO, f"--topology={topology}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"jmid: error: --topology={topology}: ")


def test_named_remat_saves_what_it_names_and_the_plan_shows_the_memory():
  """model.remat='save:...' keeps exactly the named values of each layer for the backward
  pass: more names, more memory, between remat 'full' (nothing kept) and 'none' (all)."""
  def temp(remat: str) -> int:
    c = config_lib.from_configdict(configfile.parse(
        ["plan", DEMO, f"--config.model.remat={remat}", "--config.data.seq_len=256",
         "--config.model.n_layers=4", "--config.train.global_batch=8"]))
    return plan.make_plan(c, plan.Target(jax.devices()[:1], "1 cpu device")).memory["temp_bytes"]
  full, qkv, most, none = (temp(r) for r in ("full", "save:qkv", "save:qkv,attn,mlp_hidden",
                                                  "none"))
  assert full < qkv < most <= none, (full, qkv, most, none)
