"""`python -m jmid.checkpoint info PATH | verify PATH | average --out=DIR CKPT ...` (run through
__main__.py): apart from the checkpoint library, which neither ckpt_info nor averaging are
imported back by."""

from __future__ import annotations

from jmid import averaging, ckpt_info, cli
from jmid import checkpoint as ckpt_lib
from jmid.errors import UserError


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  usage = ("usage: python -m jmid.checkpoint info PATH | python -m jmid.checkpoint verify PATH "
           "| python -m jmid.checkpoint average --out=DIR [--key=params|ema] CKPT CKPT ...")
  if argv[:1] == ["info"] and len(argv) == 2:
    print(ckpt_info.describe(ckpt_lib.resolve_step_dir(argv[1], "PATH")))
    return 0
  if argv[:1] == ["verify"] and len(argv) == 2:
    return ckpt_info.verify_all(argv[1])
  if argv[:1] == ["average"]:
    averaging.main(argv[1:])
    return 0
  raise UserError(usage)
