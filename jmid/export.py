"""`python -m jmid.export --workdir=W [--step=S] --out=DIR [--dtype=bfloat16] [--shard-mb=N]`

A checkpoint -> a Hugging Face folder that transformers loads: config.json (RoPE in both the
transformers 4 keys `rope_theta`/`rope_scaling` and the transformers 5 `rope_parameters`),
generation_config.json, safetensors (sharded with an index above --shard-mb) and the run's
tokenizer.json when it has one. It needs only the checkpoint (its meta holds the model spec and
the config), runs on CPU, and streams: one params array at a time is read, split into per-layer
tensors and written, so memory is about one array plus one shard. The folder is written under
a temporary name and renamed at the end; a failure or an interrupt (Ctrl-C, SIGTERM) removes
that temporary folder, so --out is either complete or absent.
"""

from __future__ import annotations

import sys

from jmid import cli
from jmid.errors import UserError
from jmid.hf_write import export, write_hf

__all__ = ["export", "write_hf", "main"]  # the writing itself is in hf_write.py


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
  usage = ("usage: python -m jmid.export --workdir=W [--step=S] --out=DIR "
           "[--dtype=float32|bfloat16|float16] [--shard-mb=5000]")
  bad = [a for a in argv if not (a.startswith("--") and "=" in a)] + sorted(
      set(opts) - {"workdir", "step", "out", "dtype", "shard-mb"})
  if bad or "workdir" not in opts or "out" not in opts:
    raise UserError(usage)
  try:
    step = int(opts["step"]) if "step" in opts else None
    shard_mb = float(opts.get("shard-mb", 5000))
  except ValueError:
    raise UserError(f"--step and --shard-mb must be numbers; {usage}") from None
  with cli.STOP.installed():
    files = export(opts["workdir"], opts["out"], step, opts.get("dtype", "float32"), shard_mb)
  print(f"jmid: exported {opts['workdir']} -> {opts['out']} ({len(files)} safetensors file(s))")
  return 0


if __name__ == "__main__":
  sys.exit(main())
