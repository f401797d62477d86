"""Runtime defaults (jmid/runtime.py): XLA parses jmid's GPU flags on this jaxlib (each CI lane
is one jaxlib version), and the defaults never override what the user set."""

import os
import subprocess
import sys

import jax

from jmid import gpus, runtime


def _jax_starts_with(flags: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                        env=env, capture_output=True, text=True, timeout=120)


def test_xla_parses_every_gpu_flag_and_would_refuse_an_unknown_one():
  """XLA aborts at start on a flag it does not know (a flag renamed or removed by a jaxlib
  update): the flags are parsed by every backend, so a CPU start checks them."""
  ok = _jax_starts_with(" ".join(runtime.GPU_XLA_FLAGS))
  assert ok.returncode == 0 and ok.stdout.strip() == "cpu", ok.stderr[-2000:]
  bad = _jax_starts_with("--xla_gpu_enable_no_such_thing=true")
  assert bad.returncode != 0 and "no_such_thing" in bad.stderr


def test_defaults_apply_only_on_gpus_and_only_where_unset(monkeypatch):
  monkeypatch.setattr(gpus, "cuda_plugin", lambda: "jax_plugins.xla_cuda12")
  for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS"):
    monkeypatch.delenv(k, raising=False)
  assert len(runtime.set_env_defaults()) == 2
  assert os.environ["XLA_FLAGS"].split() == list(runtime.GPU_XLA_FLAGS)
  assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9" == str(gpus.mem_fraction())
  monkeypatch.setenv("XLA_FLAGS", "--mine")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  assert runtime.set_env_defaults() == [] and os.environ["XLA_FLAGS"] == "--mine"
  monkeypatch.delenv("XLA_FLAGS")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # no GPU backend in this process: nothing set
  assert runtime.set_env_defaults() == [] and "XLA_FLAGS" not in os.environ
  monkeypatch.setattr(gpus, "cuda_plugin", lambda: None)
  monkeypatch.delenv("JAX_PLATFORMS")
  assert runtime.set_env_defaults() == []


def test_the_compilation_cache_is_for_accelerators(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert runtime.compilation_cache(str(tmp_path), "cpu") == ""
    assert runtime.compilation_cache("", "gpu") == ""
    assert runtime.compilation_cache(str(tmp_path), "tpu") == f"compilation cache {tmp_path}"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    assert runtime.compilation_cache("/elsewhere", "gpu") == f"compilation cache {tmp_path}"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
