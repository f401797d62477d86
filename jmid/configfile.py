"""--config=FILE [--config.section.key=value ...]: the config flag of train and plan, parsed
with every failure as one ConfigError line."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import ConfigDict, config_flags

from jmid.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (Python).")


def parse(argv: list[str]) -> ConfigDict:
  """--config with its overrides applied, every failure as one ConfigError line.

  ml_collections defers errors: an unknown override key raises AttributeError while flags
  parse, and a config file that fails to load raises only when the config is first read.
  """
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # an earlier parse's overrides: parse again in one process
  saved, sys.argv = sys.argv, list(argv)  # ml_collections reads overrides from sys.argv
  try:
    flags.FLAGS(argv)
    cfg = _CONFIG.value
    if cfg is None:
      raise ConfigError("--config is required, e.g. --config=configs/demo/pretrain.py")
    cfg.to_dict()
  except ConfigError:
    raise
  except (AttributeError, KeyError) as e:
    what = str(e.args[0] if e.args else e).strip("'\" ")
    keys = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
    what = next((k for k in keys if k.split(".")[-1] == what), what)
    raise ConfigError(f"an override names a config key that does not exist: {what}; "
                      "configs/base.py lists every key") from None
  except Exception as e:  # a bad flag value, a missing config file, or one that raised
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    raise ConfigError(f"--config: {lines[-1] if lines else repr(e)}") from None
  finally:
    sys.argv = saved
  return cfg
