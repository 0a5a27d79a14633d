"""Online calibration: a fresh map is the identity, the map converges to measured frequencies, stays
monotone, and inside PreScope an over-confident predictor stops buying wrong prefetches."""

from __future__ import annotations

import numpy as np
import pytest
from test_peers import COSTS, Fixed, cache_with, execute, layout

from prescope.policies import make_policy
from prescope.policies.base import LayerView
from prescope.policies.reliability import Reliability


def forecast(p):
    return [(list(p), [1.0] * len(p))]


def test_a_fresh_map_is_the_identity():
    p = [0.0, 0.001, 0.05, 0.33, 0.5, 0.949, 0.97, 1.0]
    assert Reliability(3).apply(forecast(p) * 3) == [(p, [1.0] * len(p))] * 3


def test_the_map_converges_to_the_measured_frequency_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    rel, truth = Reliability(1, bins=10, prior=5.0), (lambda p: 0.2 + 0.5 * p)  # over-confident at the top
    for _ in range(3000):
        p = rng.random(16)
        rel.record(0, forecast(p))
        rel.observe(1, np.flatnonzero(rng.random(16) < truth(p)))
    probe = np.linspace(0.06, 0.94, 12)
    got = np.array(rel.apply(forecast(probe))[0][0])
    assert np.abs(got - truth(probe)).max() < 0.05
    assert np.all(np.diff(got) > 0)  # a rising truth keeps the predictor's order
    x, y = rel.maps()[0]
    assert np.all(np.diff(x) > 0) and np.all(np.diff(y) >= 0)


def test_rates_are_pooled_into_a_non_decreasing_map():
    rel = Reliability(1, bins=4, prior=1.0)
    for _ in range(200):  # p = 0.6 is never used, p = 0.4 always: the map pools them
        rel.record(0, forecast([0.4, 0.6]))
        rel.observe(1, [0])
    x, y = rel.maps()[0]
    assert np.all(np.diff(y) >= 0)
    lo, hi = rel.apply(forecast([0.4, 0.6]))[0][0]
    assert lo == pytest.approx(hi, abs=1e-9) and 0.4 < lo < 0.6


def test_predictions_are_scored_once_per_distance_and_dropped_at_a_new_step():
    rel = Reliability(2)
    rel.record(0, forecast([1.0, 0.0]) * 2)  # layer 0 predicts layers 1 and 2
    rel.observe(1, [1])
    assert rel.count.sum() == 2 and rel.hits.sum() == 1 and 2 in rel.pending
    rel.new_step()
    rel.observe(2, [0])
    assert rel.count.sum() == 2
    with pytest.raises(ValueError, match="depth >= 1"):
        Reliability(0)


def test_prescope_plans_with_calibrated_probabilities():
    """The predictor swears (p = 1) that expert 0 of every later layer is needed; the routing never uses it.
    Uncalibrated (the default), the planner's candidate keeps p = 1; calibrated, its p falls once the evidence outweighs the prior."""
    L, E = 4, 8
    lie = {(at, d): [1.0] + [0.0] * (E - 1) for at in range(L) for d in range(1, L)}
    chance = {}
    for calibrate in (False, True):
        policy = make_policy("prescope", predictor=Fixed(layout(L, E, 2), lie), calibrate=calibrate, layer_gap_s=2.0)
        cache = cache_with(2 * L, L, [])
        policy.reset(cache, E, COSTS)
        for step in range(30):
            for layer in range(L):
                v = LayerView(step, layer, L, E, (1, 2), (1, 1), None, None)
                execute(policy, cache, layer, policy.plan(v, cache))
        inst = policy.instance(LayerView(30, 0, L, E, (1, 2), (1, 1), None, None), cache)
        chance[calibrate] = [c.prob for c in inst.predictions[0] if c.expert == 0]
    assert chance[False] == [1.0] and chance[True] and chance[True][0] < 0.5, chance
