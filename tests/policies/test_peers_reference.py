"""PreScope's planning inputs, computed over arrays (`PreScope.window_forecast`, `offered`, `victim_ids`,
`chance_grid`, `window.py`, `ExpertCache.offered_arrays` and `resident_keys`), equal their straightforward
definitions, kept here as the reference: the same forecast, candidates, expected compute, resident keys and
victims offered with the same chances, so the same instance and the same plan, at every planned layer of real
replays (the shipped Qwen3-30B-A3B trace, batch 1, 4 and 16, prescope and ceiling, with and without window
reuse), and the same layers skipped (`nothing_to_plan`)."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from conftest import DATA

from prescope.policies import limits, make_policy, peers, presched
from prescope.policies.cache import SlotState
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.segments import decode_segments
from prescope.sim.simulator import replay


def victim_chances(policy, view, cache, forecast) -> list[tuple[float, tuple[int, int]]]:
    """`PreScope.victim_ids` as (chance, key) pairs."""
    q, ids = policy.victim_ids(view, cache, forecast)
    return [(c, divmod(i, policy.num_experts)) for c, i in zip(q.tolist(), ids.tolist(), strict=True)]


def reference_chances(policy, view, cache, forecast) -> list[tuple[float, tuple[int, int]]]:
    """PreScope's victim chances as first written: layer by layer, key by key (`PreScope.victim_ids`'
    docstring); ceiling's override on top where the policy is a ceiling and the step's future is known."""
    layer, routed, chances, memory = view.layer, {(view.layer, e) for e in view.experts}, [], policy.memory
    for j in range(cache.num_layers):
        d, window = j - layer, 1 <= j - layer <= len(forecast)
        keys = cache.evictable_keys(j, keep_fresh=window)
        if d == 0:
            keys = [key for key in keys if key not in routed]
        if window and not policy.window_reuse:
            seen = [forecast[d - 1][0][e] for _, e in keys]
        else:
            seen = memory.chances(j, [e for _, e in keys], ran=d <= 0)
            if window:
                row = forecast[d - 1][0]
                seen = [max(row[e], q) for (_, e), q in zip(keys, seen, strict=True)]
        chances += zip(seen, keys, strict=True)
    if isinstance(policy, limits.Ceiling) and view.future is not None:
        used = {(view.layer + d, e) for d, experts in enumerate(view.future, 1) for e in experts}
        chances = [(1.0 if key in used else 0.0 if key[0] > view.layer else q, key) for q, key in chances]
    return chances


def reference_held(policy, view, cache, forecast, need: int) -> tuple[presched.Held, ...]:
    return tuple(presched.Held(key, min(1.0, q)) for q, key in heapq.nsmallest(need, reference_chances(policy, view, cache,
                                                                                                  forecast)))


def reference_predictions(policy, view, cache, forecast) -> tuple[tuple[presched.Candidate, ...], ...]:
    """The candidates as first written: per window layer, the absent experts with p > worth, likeliest first."""
    keep, worth, out = policy.candidates or 2 * policy.top_k(), policy.worth(), []
    for d, (p, n) in enumerate(forecast, 1):
        absent = [e for e in range(len(p)) if p[e] > worth and not cache.is_present((view.layer + d, e))]
        absent.sort(key=p.__getitem__, reverse=True)
        out.append(tuple(presched.Candidate(e, p[e], max(1, round(n[e]))) for e in absent[:keep]))
    return tuple(out)


def reference_compute(policy, forecast) -> tuple[float, ...]:
    """c_d = Σ_e p_e·gpu(round(n_e)) (n_e >= 1) as first written, one window layer at a time."""
    out = []
    for p, n in forecast:
        tokens = np.maximum(np.rint(np.asarray(n, dtype=np.float64)), 1).astype(np.int64)
        times = np.array([policy.costs.gpu(int(c)) for c in tokens])
        out.append(float(np.dot(np.maximum(np.asarray(p, dtype=np.float64), 0.0), times)))
    return tuple(out)


def reference_resident(cache, layers: range) -> frozenset:
    return frozenset(cache.owner(s) for s in range(cache.num_slots)
                     if cache.state(s) is SlotState.RESIDENT and cache.owner(s)[0] in layers)


@pytest.fixture(scope="module")
def qwen3():
    return load_llamacpp_trace(DATA / "routing" / "qwen3-30b-a3b.route.csv")


@pytest.mark.parametrize("name,options", [("prescope", {}), ("ceiling", {}), ("prescope", {"window_reuse": False})])
@pytest.mark.parametrize("batch,steps", [(1, 6), (4, 6), (16, 3)])
def test_planning_inputs_equal_the_reference_at_every_planned_layer(qwen3, name, options, batch, steps):
    policy = make_policy(name, gate=False, **options)
    assert isinstance(policy, peers.PreScope)
    built, skip = policy.instance, policy.nothing_to_plan
    checked, skipped, crowded = [], [], []

    def nothing_to_plan(view, cache, forecast, offered=None):
        lists = policy.forecast(view, policy.lookahead)
        np.testing.assert_array_equal(forecast.p, np.array([p for p, _ in lists]).reshape(forecast.p.shape))
        np.testing.assert_array_equal(forecast.n, np.array([n for _, n in lists]).reshape(forecast.n.shape))
        empty = all(cache.is_resident((view.layer, e)) for e in view.experts) and not any(
            reference_predictions(policy, view, cache, forecast))
        assert skip(view, cache, forecast, offered) == empty
        skipped.append(empty)
        return empty

    def instance(view, cache, forecast=None, offered=None):
        inst = built(view, cache, forecast, offered)
        assert inst.predictions == reference_predictions(policy, view, cache, forecast)
        assert inst.compute == reference_compute(policy, forecast)
        assert inst.resident == reference_resident(cache, range(view.layer, view.layer + len(forecast) + 1))
        chances = victim_chances(policy, view, cache, forecast)
        reference = reference_chances(policy, view, cache, forecast)
        assert sorted(chances) == sorted(reference)
        need = len(view.experts) + sum(len(c) for c in inst.predictions)
        roomy = cache.free_count >= need + len(forecast)  # every load takes a free slot: no victim is offered
        assert inst.evictable == (() if roomy else reference_held(policy, view, cache, forecast, need))
        crowded.append(not roomy)
        checked.append(len(reference))
        return inst

    policy.instance, policy.nothing_to_plan = instance, nothing_to_plan
    cut = decode_segments(qwen3, batch) if batch > 1 else qwen3
    replay(cut, policy, "h200", budget_share=0.25, batch_size=batch, max_steps=steps)
    assert len(checked) > 100 and max(checked) > 500  # planned layers with a full pool of keys to choose from
    assert any(crowded) or batch == 1  # planned layers that offered victims (batch 1 fills no pool in 6 steps)
    assert sum(skipped) == len(skipped) - len(checked)  # every layer not skipped was planned
