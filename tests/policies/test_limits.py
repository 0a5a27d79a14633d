"""The limits: Belady's prefetching limit on synthetic views, and the perfect-prediction ceiling, which no policy
beats on replays where it should hold (real traces at link-bound expert sizes, several profiles, budgets and
batches) and which is never slower than prescope with the same costs; earlier results' `oracle` still reads."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import DATA
from test_peers import COSTS, MS, cache_with, hand_profile, synthetic_trace, view
from test_peers_reference import victim_chances

from prescope.hardware.profiles import load_profile
from prescope.policies import LIMITS, POLICIES, current_name, make_policy, parse_policy
from prescope.policies.base import Costs
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.segments import decode_segments
from prescope.routing.trace import Trace
from prescope.sim.simcost import SimTimes
from prescope.sim.simulator import replay

REAL_TRACES = ("qwen3-30b-a3b", "gpt-oss-120b")
ROUNDING = 1e-9  # relative: the ceiling may tie a policy, never trail it


# ---- belady ------------------------------------------------------------------------------------------------

def test_belady_prefetches_exactly_the_future_in_order_of_use():
    policy = make_policy("belady")
    cache = cache_with(32, 4, [(2, 3)])
    policy.reset(cache, 8, COSTS)
    future = ((1, 2), (3, 4), (5, 6))
    orders = policy.plan(view(0, [0, 7], future=future), cache)
    orders.check(view(0, [0, 7]))
    assert orders.prefetch == [(1, 1), (1, 2), (2, 4), (3, 5), (3, 6)]  # (2, 3) is resident
    # two misses: loading both ends the GPU at 2.5, loading one and running one on the CPU at max(1.5, 2)
    assert (orders.gpu, orders.cpu) == ([0], [7])


def test_belady_evicts_the_key_used_farthest_ahead_and_never_one_needed_sooner():
    """L = 4, running layer 1. Held: (2, 5) used next layer; (3, 1) used in 2 layers; (0, 4) and (1, 6) not this
    step, so next step at their own layer: 4 − 1 + 0 = 3 and 4 − 1 + 1 = 4 layers ahead."""
    policy = make_policy("belady")
    cache = cache_with(4, 4, [(2, 5), (3, 1), (0, 4), (1, 6)])
    policy.reset(cache, 8, None)
    orders = policy.plan(view(1, [6], future=((5,), (1, 2))), cache)
    assert orders.prefetch == [(3, 2)]  # the only future key absent; used 2 ahead, (1, 6) is farther
    assert cache.owner(policy.victim(cache, (3, 2))) == (0, 4)  # (1, 6) is the running layer's: protected
    # a miss of the running layer takes the farthest key, here the running layer's own (1, 6) is pinned
    cache.pin((1, 6))
    assert cache.owner(policy.victim(cache, (1, 0))) == (0, 4)
    # nothing absent is worth a key needed sooner: full cache of keys used before the candidate
    tight = cache_with(2, 4, [(2, 5), (1, 6)])
    policy.reset(tight, 8, None)
    assert policy.plan(view(1, [6], future=((5,), (1,))), tight).prefetch == []


@pytest.mark.parametrize("name", LIMITS)
def test_without_the_future_a_limit_says_so_and_still_runs(name):
    policy = make_policy(name)
    cache = cache_with(8, 4, [])
    policy.reset(cache, 8, COSTS)
    with pytest.warns(RuntimeWarning, match="no LayerView.future"):
        orders = policy.plan(view(0, [1, 2]), cache)
    orders.check(view(0, [1, 2]))
    assert not orders.prefetch  # nothing seen yet to predict from


def test_results_that_name_the_oracle_read_as_belady():
    assert current_name("oracle") == "belady" and current_name("oracle+sync") == "belady+sync"
    assert current_name("oracle[lookahead=2]") == "belady[lookahead=2]" and current_name("oracles") == "oracles"
    assert parse_policy("oracle").name == "belady" and parse_policy("oracle+sync").async_io is False
    assert make_policy("oracle").name == "belady" and "oracle" not in POLICIES
    assert set(LIMITS) == {"belady", "ceiling"} <= set(POLICIES)


# ---- the ceiling on synthetic views --------------------------------------------------------------------------

def test_ceiling_predicts_the_true_future_with_its_token_counts():
    """p = 1 for the experts a window layer routes, with their counts from LayerView.future_tokens, else the
    running layer's mean tokens per expert; 0 for the others."""
    policy = make_policy("ceiling", lookahead=2)
    cache = cache_with(32, 4, [])
    policy.reset(cache, 8, COSTS)
    v = view(0, [0, 7], future=((1, 2), (3,), (5,)), tokens=[3, 1])
    v = dataclasses.replace(v, future_tokens=((4, 1), (2,), (6,)))
    (p1, n1), (p2, n2) = policy.forecast(v, 2)
    assert [e for e in range(8) if p1[e]] == [1, 2] and set(p1) == {0.0, 1.0} and (n1[1], n1[2]) == (4.0, 1.0)
    assert [e for e in range(8) if p2[e]] == [3] and n2[3] == 2.0
    (p1, n1), _ = policy.forecast(dataclasses.replace(v, future_tokens=None), 2)
    assert n1[1] == n1[2] == 2.0  # (3 + 1) tokens over 2 routed experts


def test_ceiling_keeps_a_key_a_later_layer_of_the_step_uses():
    """Beyond the window the memory knows nothing of (3, 6); the true future says layer 3 routes it, so its
    chance of being needed is 1, and the plan evicts the unused (3, 4) instead."""
    policy = make_policy("ceiling", lookahead=1)
    cache = cache_with(3, 4, [(3, 6), (3, 4), (0, 0)])
    policy.reset(cache, 8, Costs(load=1.0, gpu=lambda n: 0.5, cpu=lambda n: 2.0, layer_gap=5.0))
    v = view(0, [0], future=((2,), (1,), (6,)))
    chances = {key: q for q, key in victim_chances(policy, v, cache, policy.forecast(v, 1))}
    assert chances[(3, 6)] == 1.0 and chances[(3, 4)] < 1.0
    orders = policy.plan(v, cache)
    assert orders.prefetch == [(1, 2)] and cache.owner(policy.victim(cache, (1, 2))) == (3, 4)


def test_ceiling_plans_what_presched_plans_with_the_true_future_at_probability_one():
    """On random views (4 layers of 8 experts, random residents, true future with token counts), the ceiling's
    orders are PreSched's plan of an Instance built by hand from the truth: every expert a window layer routes
    and the GPU lacks is a candidate with p = 1 and its true tokens, each layer's expected compute the GPU time
    of what it truly routes; slots to spare, so no victim is weighed."""
    import random

    from prescope.policies import presched
    from prescope.policies.cache import ExpertCache

    rng, L, E, K, planned = random.Random(7), 4, 8, 2, 0
    costs = Costs(load=1.0, gpu=lambda n: 0.4 + 0.05 * n, cpu=lambda n: 0.6 + 0.5 * n, layer_gap=0.3,
                  host_hides_device=False)
    for _ in range(60):
        layer, lookahead = rng.randrange(L), rng.choice([1, 2, 3])
        routed = [tuple(rng.sample(range(E), K)) for _ in range(L)]
        counts = [tuple(rng.randint(1, 4) for _ in range(K)) for _ in range(L)]
        keys = rng.sample([(j, e) for j in range(L) for e in range(E)], rng.randint(0, 12))
        cache = ExpertCache(64, L)
        for slot, key in enumerate(keys):
            cache.assign(key, slot, speculative=False)
            cache.mark_ready(key)
        policy = make_policy("ceiling", lookahead=lookahead, gate=False)
        policy.reset(cache, E, costs)
        v = view(layer, routed[layer], future=tuple(routed[layer + 1:]), tokens=list(counts[layer]))
        v = dataclasses.replace(v, future_tokens=tuple(counts[layer + 1:]))
        orders = policy.plan(v, cache)
        depth = min(lookahead, L - 1 - layer)
        window = range(layer + 1, layer + 1 + depth)
        predictions = tuple(tuple(presched.Candidate(e, 1.0, n) for e, n in sorted(zip(routed[j], counts[j], strict=True))
                                  if not cache.is_present((j, e))) for j in window)
        inst = presched.Instance(layer, routed[layer], counts[layer], predictions, costs.load, costs.gpu, costs.cpu,
                                 resident=frozenset(cache.present_keys()), free_slots=cache.free_count,
                                 demand_free=0.0, gap=costs.layer_gap,
                                 compute=tuple(sum(map(costs.gpu, counts[j])) for j in window))
        want = presched.plan(inst)
        assert (orders.gpu, orders.cpu, orders.prefetch) == (list(want.gpu), list(want.cpu), list(want.prefetch))
        planned += bool(want.prefetch)
    assert planned >= 20, planned  # most views prefetch: the comparison is not only of empty plans


# ---- replays: the ceiling against every policy -------------------------------------------------------------

def own_async_io(policy, trace: Trace, profile, layout=None) -> bool:
    """The policy's own AsyncIO choice with the costs the replay gives it (as `simulate-compare` asks)."""
    return policy.uses_async_io(SimTimes(layout or trace.layout, load_profile(profile), 0).costs())


def latencies(trace: Trace, profile, budget: float, batch: int, **replay_options) -> dict[str, tuple[float, float]]:
    """Every policy's (mean token latency, mean lower bound) on one replay cell, with its own AsyncIO choice."""
    out = {}
    for name in POLICIES:
        policy = make_policy(name)
        r = replay(trace, policy, profile, budget_share=budget, batch_size=batch,
                   async_io=own_async_io(policy, trace, profile, replay_options.get("layout")), **replay_options)
        out[name] = (r.totals["mean_token_latency_s"], r.totals["lower_bound_step_s"])
    return out


def test_on_a_link_bound_synthetic_trace_no_policy_that_predicts_beats_the_ceiling():
    """4 layers of 8 experts, half of each layer's routing kept from the previous token, 1 ms loads. Belady (the
    other limit) may win here: it ranks the keys no later layer of the step routes by when the next step needs
    them, the ceiling by PreScope's decayed frequencies (measured: belady 0.96-0.99x the ceiling's latency)."""
    trace = synthetic_trace()
    for budget in (0.25, 0.5):
        times = latencies(trace, hand_profile(), budget, 1)
        ceiling, bound = times["ceiling"]
        print(f"budget {budget:.0%}: " + ", ".join(f"{k} {v[0] / MS:.3f}" for k, v in times.items()) + " ms/token")
        assert bound <= ceiling * (1 + ROUNDING)
        assert all(ceiling <= t * (1 + ROUNDING) for name, (t, _) in times.items() if name not in LIMITS), times
        assert times["belady"][0] > 0.95 * ceiling


@pytest.fixture(scope="module")
def real_traces() -> dict[str, Trace]:
    return {name: load_llamacpp_trace(DATA / "routing" / f"{name}.route.csv") for name in REAL_TRACES}


@pytest.mark.parametrize("name", REAL_TRACES)
def test_on_real_traces_at_link_bound_sizes_no_policy_beats_the_ceiling(real_traces, name):
    """The real routing of each trace with experts 20 times its own (61 and 252 MiB: link-bound at batch 4),
    the decode cut in 4 segments decoded together; on a PCIe 3 and an H200 profile, at 25 % and 50 %."""
    trace = decode_segments(real_traces[name], 4)
    twice = dataclasses.replace(trace.layout, expert_bytes=20 * trace.layout.expert_bytes,  # every layer's experts
                                layer_expert_bytes=tuple(20 * b for b in trace.layout.layer_expert_bytes))
    for profile in ("v100-pcie3", "h200"):
        for budget in (0.25, 0.5):
            times = latencies(trace, profile, budget, 4, layout=twice, max_steps=6)
            ceiling, bound = times["ceiling"]
            beaten = {k: round(v[0] / ceiling, 4) for k, v in times.items() if v[0] < ceiling * (1 - ROUNDING)}
            assert bound <= ceiling and not beaten, f"{name} {profile} {budget:.0%}: {beaten} beat the ceiling"


def test_the_ceiling_is_never_slower_than_prescope_with_the_same_costs(real_traces):
    """Both with their defaults (gate on), on the real traces at their own expert sizes and batch 1 and 4."""
    worst = 0.0
    for name, trace in real_traces.items():
        for batch in (1, 4):
            cut = decode_segments(trace, batch) if batch > 1 else trace
            for profile in ("v100-pcie3", "h200"):
                for budget in (0.25, 0.5):
                    run = {}
                    for policy in ("prescope", "ceiling"):
                        p = make_policy(policy)
                        run[policy] = replay(cut, p, profile, budget_share=budget, batch_size=batch, max_steps=8,
                                             async_io=own_async_io(p, cut, profile)).totals["mean_token_latency_s"]
                    worst = max(worst, run["ceiling"] / run["prescope"])
                    assert run["ceiling"] <= run["prescope"] * (1 + ROUNDING), (name, batch, profile, budget, run)
    print(f"ceiling / prescope latency at most {worst:.4f}")
    assert math.isfinite(worst)
