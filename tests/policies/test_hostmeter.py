"""The measured host time per layer that PreScope's gate reads as P where the engine measures it."""

from __future__ import annotations

import pytest
from test_gate import engine_costs, gated
from test_peers import cache_with, view

from prescope.policies.hostmeter import HostMeter


def test_p_is_the_median_planned_layer_less_the_median_on_demand_one_first_plans_left_out():
    meter = HostMeter()
    assert meter.plan_host(6) is None
    meter.record(0, 6, True, 5.0)  # layer 0's first plan (a graph captured): left out
    assert meter.plan_host(6) is None and meter.measuring(6)
    for seconds in (0.4, 0.5, 9.0):  # one outlier among three: the median
        meter.record(0, 6, True, seconds)
    assert meter.plan_host(6) == pytest.approx(0.5)
    for seconds in (0.1, 0.2, 0.1):
        meter.record(1, 6, False, seconds)
    assert meter.plan_host(6) == pytest.approx(0.4)
    meter.record(1, 6, True, 7.0)  # layer 1's first plan: left out too
    assert meter.plan_host(6) == pytest.approx(0.4)
    # a faster on-demand layer than a planned one never makes P negative
    for _ in range(HostMeter.WINDOW):
        meter.record(2, 6, False, 3.0)
    assert meter.plan_host(6) == 0.0


def test_a_new_step_shape_starts_afresh():
    meter = HostMeter()
    meter.record(0, 48, True, 1.0)
    meter.record(0, 48, True, 2.0)
    assert meter.plan_host(48) == 2.0 and meter.plan_host(6) is None
    meter.record(0, 6, True, 3.0)  # decode after prefill: its own first plan of layer 0 is left out again
    assert meter.plan_host(6) is None and meter.plan_host(48) is None


def test_the_gate_probes_every_so_many_on_demand_layers_only_where_measured():
    meter = HostMeter()
    assert not any(meter.probe(6, False) for _ in range(3 * HostMeter.PROBE_EVERY))  # nothing measured: as told
    meter.record(0, 6, False, 0.1)
    decisions = [meter.probe(6, False) for _ in range(2 * HostMeter.PROBE_EVERY)]
    assert decisions.count(True) == 2 and decisions[HostMeter.PROBE_EVERY - 1]
    assert meter.probe(6, True)  # a layer that pays is planned, and restarts the count
    assert sum(meter.probe(6, False) for _ in range(HostMeter.PROBE_EVERY - 1)) == 0


def test_the_gate_weighs_the_measured_planning_time_instead_of_the_profiles():
    """Costs where planning at the profile's P (0.05) pays; the engine then measures 2 s per planned layer
    against 0.1 on demand: the gate's P becomes 1.9 and it runs the layers on demand; without measured_plan, or
    where nothing is measured (the simulator), the profile's P stays."""
    costs = engine_costs(plan=0.05, layer_gap=0.3)
    cache = cache_with(16, 8, [(0, 1)])
    v = view(0, [1, 2, 3], L=8)
    for options, expect in (({}, 1.9), ({"measured_plan": False}, 0.05)):
        policy = gated(costs, cache, **options)
        profile_gain = policy.plan_gain(v, cache)
        assert policy.speculation_pays(v, cache)
        policy.layer, policy.on_demand = 0, False
        for layer, seconds in ((0, 9.0), (0, 2.0), (1, 9.0), (1, 2.0)):
            policy.layer = layer
            policy.host_measured(seconds)
        policy.on_demand = True
        policy.host_measured(0.1)
        assert policy.plan_gain(v, cache) == pytest.approx(profile_gain - (expect - 0.05))
    unmeasured = gated(costs, cache)
    unmeasured.speculation_pays(v, cache)
    assert unmeasured.measured_plan_host() is None
