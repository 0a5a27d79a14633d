"""PreScope's planning inputs, computed over arrays (`PreScope.victim_arrays`, `Memory.chance_arrays`,
`ExpertCache.evictable_arrays`), equal their straightforward definitions, kept here as the reference: the same
victims offered with the same chances, so the same instance and the same plan, at every planned layer of real
replays (the shipped Qwen3-30B-A3B trace, batch 1 and 4, prescope and ceiling, with and without window reuse)."""

from __future__ import annotations

import pytest
from conftest import DATA

from prescope.policies import limits, make_policy, peers, presched
from prescope.policies.predictive import smallest
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.segments import decode_segments
from prescope.sim.simulator import replay


def reference_chances(policy, view, cache, forecast) -> list[tuple[float, tuple[int, int]]]:
    """PreScope's victim chances as first written: layer by layer, key by key (`PreScope.victim_chances`'
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
    return tuple(presched.Held(key, min(1.0, q)) for q, key in smallest(need, reference_chances(policy, view, cache,
                                                                                                  forecast)))


@pytest.fixture(scope="module")
def qwen3():
    return load_llamacpp_trace(DATA / "routing" / "qwen3-30b-a3b.route.csv")


@pytest.mark.parametrize("name,options", [("prescope", {}), ("ceiling", {}), ("prescope", {"window_reuse": False})])
@pytest.mark.parametrize("batch", [1, 4])
def test_planning_inputs_equal_the_reference_at_every_planned_layer(qwen3, name, options, batch):
    policy = make_policy(name, gate=False, **options)
    assert isinstance(policy, peers.PreScope)
    built = policy.instance
    checked = []

    def instance(view, cache, forecast=None, offered=None):
        inst = built(view, cache, forecast, offered)
        chances = policy.victim_chances(view, cache, forecast)
        reference = reference_chances(policy, view, cache, forecast)
        assert sorted(chances) == sorted(reference)
        need = len(view.experts) + sum(len(c) for c in inst.predictions)
        assert inst.evictable == reference_held(policy, view, cache, forecast, need)
        checked.append(len(reference))
        return inst

    policy.instance = instance
    cut = decode_segments(qwen3, batch) if batch > 1 else qwen3
    replay(cut, policy, "h200", budget_share=0.25, batch_size=batch, max_steps=6)
    assert len(checked) > 100 and max(checked) > 500  # planned layers with a full pool of keys to choose from
