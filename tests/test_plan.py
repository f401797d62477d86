"""python -m jmid.plan: the train step compiled ahead of time for a target, nothing allocated;
its figures are the compiled step's own memory analysis, and a step that cannot fit is exit 3.
"""

import json

import jax
import pytest

from jmid import build, configfile, plan, sharding
from jmid import config as config_lib

DEMO = "--config=configs/demo/pretrain.py"


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


def test_an_8b_shape_that_cannot_fit_is_exit_3_with_what_to_change(capsys):
  shape = ["--config.model.d_model=4096", "--config.model.n_layers=32",
           "--config.model.n_heads=32", "--config.model.n_kv_heads=8",
           "--config.model.d_ff=14336", "--config.model.vocab_size=128256",
           "--config.data.seq_len=1024", "--config.train.global_batch=8"]
  assert plan.main([DEMO, *shape]) == 3
  out = capsys.readouterr().out
  assert "DOES NOT FIT" in out and "jmid plan: try " in out and "model.remat" in out


@pytest.mark.parametrize("topology", ["h100", "v9z:2x2", "v5e"])
def test_an_unknown_target_is_one_line(topology, capsys):
  assert plan.main([DEMO, f"--topology={topology}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"jmid: error: --topology={topology}: ")
