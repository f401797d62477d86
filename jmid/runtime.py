"""Runtime defaults for accelerators: XLA's GPU flags, jax's GPU memory share, the persistent
compilation cache. Each is set only where the user has not set it, and train logs them.

The flags overlap communication with compute, which is most of what a multi-GPU step can gain
from XLA's scheduler (MaxText and Levanter ship the same ones); each parses on every jaxlib we
support (tests/test_runtime.py starts jax with them on both CI lanes). They are set only when
jax's CUDA plugin is installed and JAX_PLATFORMS does not rule the GPU out: a CPU or TPU run
keeps its XLA_FLAGS as they were.
"""

from __future__ import annotations

import os

import jax

from jmid import gpus

GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # collectives overlap compute
    "--xla_gpu_enable_pipelined_all_gather=true",  # fsdp's weight gathers, a layer ahead
    "--xla_gpu_enable_pipelined_reduce_scatter=true",  # its gradient scatters, a layer behind
    "--xla_gpu_enable_pipelined_all_reduce=true",  # data parallel gradient reductions
    "--xla_gpu_enable_while_loop_double_buffering=true",  # the layer scan's buffers alternate
    # fewer, larger collectives: per-layer gathers of a 1B-8B model are a few MB each
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
)


NOTES: list[str] = []  # what set_env_defaults set in this process, for train's first line


def gpu_likely() -> bool:
  """Whether this process will get jax's GPU backend (before any backend starts)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return gpus.cuda_plugin() is not None and (not platforms or "cuda" in platforms
                                              or "gpu" in platforms)


def set_env_defaults() -> list[str]:
  """Before jax starts a backend: the GPU flags and memory share where the user set none;
  returns what it set, for the log."""
  if not gpu_likely():
    return []
  done = []
  if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = " ".join(GPU_XLA_FLAGS)
    done.append(f"XLA_FLAGS: jmid's {len(GPU_XLA_FLAGS)} GPU flags (jmid/runtime.py)")
  if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:  # jax's 0.75 leaves a quarter idle
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(gpus.DEFAULT_MEM_FRACTION)
    done.append(f"XLA_PYTHON_CLIENT_MEM_FRACTION={gpus.DEFAULT_MEM_FRACTION}")
  return done


def compilation_cache(path: str, platform: str) -> str:
  """jax's persistent compilation cache at `path` ('' = off) on accelerators; on CPU (tests,
  demos) compiles are short and the cache stays off. Returns what it set, for the log."""
  if not path or platform == "cpu":
    return ""
  if jax.config.jax_compilation_cache_dir:  # the user's own setting (JAX_COMPILATION_CACHE_DIR)
    return f"compilation cache {jax.config.jax_compilation_cache_dir}"
  where = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", where)
  return f"compilation cache {where}"
