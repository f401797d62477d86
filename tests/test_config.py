"""Config validation of data sources and mixture schedules (one clear ConfigError each)."""

import pytest
from ml_collections import ConfigDict

from jmid import config as config_lib
from jmid.errors import ConfigError
from tests.helpers import tiny_configdict


def _with(mixture=None, **source):
  c = tiny_configdict()
  c.data.demo = False
  c.data.sources.web = ConfigDict(dict(path="data/web", **source))
  c.data.sources.code = ConfigDict(dict(path="data/code"))
  if mixture is not None:
    c.data.mixture = mixture
  return c


def test_sources_take_defaults_for_keys_not_given():
  s = config_lib.from_configdict(_with()).data.sources["web"]
  assert (s.format, s.kind, s.weight, s.eval_path) == ("tokens", "text", 1.0, "")


@pytest.mark.parametrize("mixture,match", [
    (((5, {"web": 1.0}),), "must cover step 0"),
    (((0, {"web": 1.0}), (0, {"code": 1.0})), r"data.mixture\[1\]: start step 0 is not after"),
    (((0, {"web": -0.5, "code": 1.0}),), r"data.mixture\[0\]\['web'\]=-0.5"),
    (((0, {"books": 1.0}),), "unknown source 'books'"),
    (((0, {"web": 0.0, "code": 0.0}),), r"data.mixture\[0\]: all weights are 0"),
    (((0, 1.0),), "each stage is"),
])
def test_bad_mixture_schedules(mixture, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.from_configdict(_with(mixture))


@pytest.mark.parametrize("source,match", [
    ({"format": "csv"}, "data.sources.web.format='csv': unknown"),
    ({"kind": "code"}, "data.sources.web.kind='code': unknown"),
    ({"weight": -1.0}, "data.sources.web.weight=-1.0"),
    ({"colour": "red"}, "data.sources.web.colour: unknown key"),
])
def test_bad_source_keys(source, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.from_configdict(_with(**source))


def test_a_valid_schedule_is_kept_in_order():
  m = ((0, {"web": 0.75, "code": 0.25}), (100, {"web": 0.5, "code": 0.5}))
  assert config_lib.from_configdict(_with(m)).data.mixture == m
