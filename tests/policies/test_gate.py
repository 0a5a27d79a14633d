"""PreScope's gate where the host hides the device (the engine): `plan_gain`, the least of what the device's
on-demand time exceeds the planned host time by, the link time to hide, and what D layers of the planned
step can hide; the simulator's branch stays `device_slack` − P."""

from __future__ import annotations

import pytest
from test_peers import Fixed, cache_with, layout, view

from prescope.policies import make_policy, parse_policy
from prescope.policies.base import Costs


def gated(costs: Costs, cache, lookahead: int = 3, **options):
    policy = make_policy("prescope", predictor=Fixed(layout(8, 8, 2), {}), lookahead=lookahead, **options)
    policy.reset(cache, 8, costs)
    return policy


def engine_costs(**kw) -> Costs:
    """Engine-like costs (seconds as plain numbers): host 0.04, the device's own work per layer 0.2 (the layer
    gap less the host), an expert's GPU time 0.01, planning 0.5, h 0.15."""
    return Costs(**{"load": 0.3, "gpu": lambda n: 0.01, "cpu": lambda n: 5.0, "layer_gap": 0.24, "host": 0.04,
                    "plan": 0.5, "transfer_host": 0.15, **kw})


def test_plan_gain_is_the_least_of_its_three_bounds():
    cache = cache_with(16, 8, [(0, 1)])  # expert 1 resident and warm, 2 and 3 absent: two misses
    v = view(0, [1, 2, 3], L=8)
    host, device = 0.04 + 2 * 0.15 + 0.5, 0.2 + 3 * 0.01
    # device-bound on demand, the planned host the limit: device + link − (host + P)
    assert gated(engine_costs(), cache).plan_gain(v, cache) == pytest.approx(device + 0.6 - host)
    # small loads: nothing more than the link time to hide (here less than the device's excess)
    small = engine_costs(load=0.05, plan=0.0, transfer_host=0.0)
    assert gated(small, cache).plan_gain(v, cache) == pytest.approx(0.1)
    # a load far longer than D layers of the step: what D layers can hide of it
    big = engine_costs(load=50.0)
    assert gated(big, cache, lookahead=2).plan_gain(v, cache) == pytest.approx(2 * host)
    assert gated(big, cache, lookahead=3).plan_gain(v, cache) == pytest.approx(3 * host)


def test_a_layer_without_misses_costs_what_its_device_work_does_not_hide_of_planning():
    cache = cache_with(16, 8, [(0, 1), (0, 2)])
    v = view(0, [1, 2], L=8)
    # the device's own work (0.2 + 0.02) hides 0.22 of the host's 0.04 + 0.5
    assert gated(engine_costs(), cache).plan_gain(v, cache) == pytest.approx(0.22 - 0.54)
    # where the device's work covers the host and planning, a layer without misses is neither gain nor cost,
    # and planning, hidden, may still prefetch for the layers after it
    hidden = gated(engine_costs(layer_gap=1.0), cache)
    assert hidden.plan_gain(v, cache) == 0.0 and hidden.speculation_pays(v, cache)
    # without a layer gap in the costs the device's own work is the experts' alone, never negative
    assert gated(engine_costs(layer_gap=0.0), cache).plan_gain(v, cache) == pytest.approx(0.02 - 0.54)


def test_the_gate_plans_a_step_of_a_few_small_misses_per_layer_that_the_old_rule_ran_half_on_demand():
    """Each layer misses 2 of its 3 experts (0.3 each): the device's work on demand (0.26 + 0.03 + 0.6) exceeds
    the host's with planning (0.04 + 0.3 + 0.5), so every layer plans; the rule before counted only the experts'
    work, 0.03 + 0.6 − 0.34 = 0.29 < 0.5, and ran every such layer on demand."""
    policy = gated(engine_costs(layer_gap=0.3), cache_with(16, 8, []))
    for layer in range(8):
        cache = cache_with(16, 8, [(layer, 1)])
        assert policy.speculation_pays(view(layer, [1, 2, 3], L=8), cache)
        assert policy.device_slack(view(layer, [1, 2, 3], L=8), cache) == pytest.approx(0.29)
    spec = parse_policy("prescope[layer_gate=True]")  # the rule before, to compare in one bench run
    before = gated(engine_costs(layer_gap=0.3), cache_with(16, 8, []), **spec.options)
    assert not any(before.speculation_pays(view(layer, [1, 2, 3], L=8), cache_with(16, 8, [(layer, 1)]))
                   for layer in range(8))


def test_the_gate_runs_rare_misses_of_long_loads_on_demand_between_them():
    """One miss of 6 s every 8 layers, 3 experts of 0.1 on the device, planning 0.5 against host 0.04: the miss
    pays planning for a few layers, what D layers of the planned step (0.69 each) can hide of its load, and
    the layers far from it, where planning costs 0.24 beyond the device's work, run on demand; a longer
    lookahead hides more of the load, so it plans longer after each miss (with D = 1 the miss stops paying)."""
    costs = Costs(load=6.0, gpu=lambda n: 0.1, cpu=lambda n: 50.0, layer_gap=0.04, host=0.04, plan=0.5,
                  transfer_host=0.15)
    planned = {}
    for lookahead in (1, 3):
        policy, decisions = gated(costs, cache_with(64, 8, []), lookahead=lookahead), []
        for step in range(4):
            for layer in range(8):
                warm = [(layer, e) for e in (1, 2, 3) if not (layer == 0 and e == 3)]
                decisions.append(policy.speculation_pays(view(layer, [1, 2, 3], L=8, step=step),
                                                         cache_with(64, 8, warm)))
        planned[lookahead] = sum(decisions[8:])
        if lookahead == 3:  # 3 layers hide 2.07 of the load, more than 7 layers without a miss cost (1.68)
            assert all(decisions[8::8])  # the miss's layer plans (for the layers after it)
        assert not any(decisions[21:24]) and not any(decisions[29:32])  # far from it: on demand
    assert planned[1] < planned[3] < 24  # one layer hides 0.69 of it: less than the rest cost, in the long run


def test_where_planning_is_free_and_the_host_is_the_bottleneck_the_gate_still_runs_on_demand():
    """A profile that charges nothing for planning (the built-in h200's plan 0, transfer 0) with a host far
    slower than the device: a layer whose loads make the device the bottleneck gains, but the host-bound layers
    around it count how far the host is behind, so the gate does not plan from then on."""
    costs = Costs(load=0.25, gpu=lambda n: 0.1, cpu=lambda n: 5.0, layer_gap=1.7, host=1.6, launch=0.1)
    policy = gated(costs, cache_with(64, 8, []))
    every = list(range(8))
    assert policy.speculation_pays(view(0, every, L=8), cache_with(64, 8, []))  # 8 misses: 0.9 + 2.0 > host 2.4
    quiet = [policy.speculation_pays(view(layer, every, L=8), cache_with(64, 8, [(layer, e) for e in every]))
             for layer in range(1, 8)]  # no miss: the host (2.4) 1.5 behind the device (0.9)
    assert not any(quiet[1:])


def test_in_the_simulator_plan_gain_is_device_slack_less_planning():
    cache = cache_with(8, 8, [])
    costs = Costs(load=1.0, gpu=lambda n: 0.5, cpu=lambda n: 2.0, host=10.0, plan=0.2, host_hides_device=False)
    policy = gated(costs, cache, lookahead=2)
    v = view(0, [1, 2], L=8)
    assert policy.plan_gain(v, cache) == pytest.approx(policy.device_slack(v, cache) - 0.2)
    pinned = gated(costs, cache, lookahead=2, plan_host_s=0.7)
    assert pinned.plan_gain(v, cache) == pytest.approx(pinned.device_slack(v, cache) - 0.7)


def test_a_tie_plans_with_plan_gain_and_not_with_the_rule_before():
    """Device work 0.5 against a host of 0.5 and free planning, no miss: plan_gain is 0, planning hidden and
    costing nothing, so it plans; the rule before (`layer_gate`) needed a device_slack above P, strictly."""
    costs = Costs(load=1.0, gpu=lambda n: 0.5, cpu=lambda n: 2.0, host=0.5)
    cache = cache_with(8, 8, [(0, 1)])
    v = view(0, [1], L=8)
    now, before = gated(costs, cache), gated(costs, cache, layer_gate=True)
    assert now.plan_gain(v, cache) == before.plan_gain(v, cache) == 0.0
    assert now.speculation_pays(v, cache) and not before.speculation_pays(v, cache)
