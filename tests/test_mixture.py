"""Mixture schedule: weights at each step, realised shares, exact resume mid-schedule."""

import json

import grain
import numpy as np
import pytest

from jmid.data import mixture

NAMES = ["web", "code", "math"]
STAGES = ((0, {"web": 0.75, "code": 0.15, "math": 0.10}),
          (100, {"web": 0.63, "code": 0.24, "math": 0.13}),
          (200, {"web": 0.0, "code": 0.5, "math": 0.5}))


def _stream(seed=0, rows_per_step=10, interpolation="step"):
  parents = [grain.MapDataset.range(10**9).map(lambda i, k=k: {"doc": np.int64(i), "k": k})
             .to_iter_dataset() for k in range(len(NAMES))]
  sched = mixture.Schedule(NAMES, STAGES, interpolation)
  return iter(mixture.ScheduledMixIterDataset(parents, sched, rows_per_step, seed))


def test_schedule_step_and_linear_values():
  step = mixture.Schedule(NAMES, STAGES, "step")
  lin = mixture.Schedule(NAMES, STAGES, "linear")
  np.testing.assert_allclose(step.weights(0), [0.75, 0.15, 0.10])
  np.testing.assert_allclose(step.weights(99), [0.75, 0.15, 0.10])
  np.testing.assert_allclose(step.weights(150), [0.63, 0.24, 0.13])
  np.testing.assert_allclose(lin.weights(50), [0.69, 0.195, 0.115])
  np.testing.assert_allclose(lin.weights(100), [0.63, 0.24, 0.13])
  np.testing.assert_allclose(lin.weights(10**6), [0.0, 0.5, 0.5])  # held after the last stage
  unnormalised = mixture.Schedule(["a", "b"], ((0, {"a": 3.0, "b": 1.0}),))
  np.testing.assert_allclose(unnormalised.weights(7), [0.75, 0.25])


@pytest.mark.parametrize("interpolation", ["step", "linear"])
@pytest.mark.parametrize("at_step", [0, 100, 150, 250])
def test_realised_shares_match_schedule_within_2_points(interpolation, at_step):
  """2000 rows drawn at one step of the schedule (rows_per_step=2000 pins the step)."""
  rows = 2000
  sched = mixture.Schedule(NAMES, STAGES, interpolation)
  parents = [grain.MapDataset.range(10**9).map(lambda i: {"doc": i}).to_iter_dataset()
             for _ in NAMES]
  it = iter(mixture.ScheduledMixIterDataset(parents, sched, rows, seed=3))
  it.set_state({"row": at_step * rows, "parents": [p.get_state() for p in it._parents]})
  counts = np.bincount([int(next(it)["source"]) for _ in range(rows)], minlength=3)
  np.testing.assert_allclose(counts / rows, sched.weights(at_step), atol=0.02)


def test_zero_weight_source_is_never_drawn():
  it = _stream(rows_per_step=1)
  drawn = [int(next(it)["source"]) for _ in range(400)]  # rows 200.. are past stage 3 at step 200
  assert 0 not in drawn[200:]
  assert 0 in drawn[:100]


def test_resume_mid_schedule_reproduces_the_stream():
  it = _stream()
  for _ in range(1037):  # across the step-100 boundary (10 rows per step)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(300)]
  fresh = _stream()
  fresh.set_state(state)
  got = [next(fresh) for _ in range(300)]
  assert [(int(w["source"]), int(w["doc"])) for w in want] == \
      [(int(g["source"]), int(g["doc"])) for g in got]


def test_stream_depends_on_seed_only_through_draws():
  a = [int(next(_stream(seed=1))["source"]) for _ in range(1)]
  s1 = [int(x["source"]) for x, _ in zip(_stream(seed=1), range(200))]
  s2 = [int(x["source"]) for x, _ in zip(_stream(seed=2), range(200))]
  s1b = [int(x["source"]) for x, _ in zip(_stream(seed=1), range(200))]
  assert s1 == s1b and s1 != s2 and a[0] == s1[0]
