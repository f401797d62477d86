"""8 fake CPU devices for every test (meshes); single-device tests use a 1-device mesh."""

import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A demo-corpus cache for the module's runs (built by the first run that needs it)."""
  return str(tmp_path_factory.mktemp("cache"))
