"""The policy interface and the two base policies, with no tensors involved."""

from __future__ import annotations

import pytest

from prescope.policies import make_policy
from prescope.policies.base import Costs, CpuMisses, LayerView, OnDemandLRU, Orders, routed_experts
from prescope.policies.cache import ExpertCache


def view(layer, experts, tokens=None, num_layers=2):
    return LayerView(step=0, layer=layer, num_layers=num_layers, num_experts=8, experts=tuple(experts),
                     tokens=tuple(tokens or [1] * len(experts)))


def fill(cache, keys):
    for key in keys:
        cache.assign(key, cache.first_free(), speculative=False)
        cache.mark_ready(key)
        cache.use(key, hit=False)


def test_routed_experts_ranks_by_tokens_and_drops_sentinels():
    assert routed_experts([[3, 1], [1, 8], [1, 3]], num_experts=8) == ((1, 3), (3, 2))


def test_orders_must_place_every_routed_expert_once():
    v = view(0, [1, 2, 3])
    Orders(gpu=[1, 3], cpu=[2]).check(v)
    with pytest.raises(ValueError, match="exactly once"):
        Orders(gpu=[1, 2], cpu=[2, 3]).check(v)
    with pytest.raises(ValueError):
        Orders(gpu=[1]).check(v)


def test_on_demand_lru_evicts_within_its_layer():
    cache = ExpertCache(num_slots=4, num_layers=2)
    policy = OnDemandLRU()
    policy.reset(cache, 8)
    assert policy.plan(view(0, [1, 2]), cache).gpu == [1, 2]
    fill(cache, [(0, 1), (0, 2), (1, 5)])
    cache.use((0, 1), hit=True)  # (0, 2) is now layer 0's least recently used
    assert policy.victim(cache, (1, 6)) == 3  # layer 1 is under its quota: the free slot
    fill(cache, [(1, 6)])
    assert cache.owner(policy.victim(cache, (0, 7))) == (0, 2)


def test_cpu_misses_keeps_hot_experts_and_sends_misses_to_the_cpu():
    cache = ExpertCache(num_slots=2, num_layers=2)
    policy = CpuMisses()
    policy.reset(cache, 8)
    orders = policy.plan(view(0, [4, 5]), cache)
    assert orders.gpu == [4] and orders.cpu == [5]  # one slot per layer: the first expert becomes hot
    fill(cache, [(0, 4)])
    assert policy.plan(view(0, [5, 4]), cache).cpu == [5]


def test_cpu_misses_loads_when_the_cost_model_says_the_link_is_faster():
    cache = ExpertCache(num_slots=2, num_layers=2)
    policy = CpuMisses()
    policy.reset(cache, 8, Costs(load=1.0, gpu=lambda n: 0.1, cpu=lambda n: 0.5 * n))
    fill(cache, [(0, 1), (1, 1)])
    orders = policy.plan(view(0, [2, 3], tokens=[8, 1]), cache)
    assert orders.gpu == [2] and orders.cpu == [3]  # 8 tokens: 4 s on the CPU vs 1.1 s over the link


def test_preload_follows_popularity():
    cache = ExpertCache(num_slots=4, num_layers=2)
    assert CpuMisses(popularity={0: [3, 1, 2], 1: [0]}).reset(cache, 8) == [(0, 3), (0, 1), (1, 0)]


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError, match="choose one of .*on_demand_lru"):
        make_policy("fastest")


def test_costs_follow_the_profiles_gpu_model():
    """Without a grouped kernel an expert's GPU time is its own kernels' (fixed cost per expert, launched by
    the host); with one (the fast engine's profile) it is what the expert adds to its wave, the wave's fixed
    cost moves into the gap between layers and the host launches nothing per expert."""
    from prescope.hardware import cost
    from prescope.hardware.profiles import load_profile
    from prescope.layout import ModelLayout
    from prescope.policies.base import costs_for

    lay = ModelLayout("OlmoeForCausalLM", "olmoe", 16, tuple(range(16)), (), 64, 8, 2048, 1024, "bfloat16",
                      3 * 2048 * 1024 * 2, 0)
    old, fast = load_profile("h200"), load_profile("h200-graphs")
    assert old.gpu_grouped is None and fast.gpu_grouped is not None
    a, b = costs_for(lay, old), costs_for(lay, fast)
    assert a.gpu(1) == cost.gpu_expert_time(1, 2048, 1024, 2, old) and a.launch == old.gpu_expert.fixed_s
    assert b.gpu(1) == cost.grouped_expert_time(1, 2048, 1024, 2, fast) and b.launch == 0.0
    assert b.gpu(1) < a.gpu(1) / 5  # 8 experts in one kernel, not 8 kernels of 97 µs
    assert b.layer_gap == pytest.approx(fast.host_overhead_per_layer_s + fast.gpu_dense.fixed_s
                                        + fast.gpu_grouped.wave_fixed_s)
    assert a.layer_gap == pytest.approx(old.host_overhead_per_layer_s + old.gpu_dense.fixed_s)
