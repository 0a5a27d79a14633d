"""The prediction-driven policies: each behaves as it says on small synthetic views, every order places each
routed expert once, set-up errors are clear, replays rank the oracle first, and inside the real engine every
policy gives the stock model's tokens."""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_model

from prescope.config import EngineConfig
from prescope.engine.engine import Engine
from prescope.hardware.profiles import (
    NEGLIGIBLE_RATE,
    BandwidthCurve,
    ComputeModel,
    HardwareProfile,
    save_profile,
)
from prescope.layout import ModelLayout
from prescope.models import adapter
from prescope.policies import POLICIES, base, make_policy, parse_policy, peers, presched
from prescope.policies.base import Costs, LayerView
from prescope.policies.cache import ExpertCache
from prescope.predict.predictors import GateLookahead, Oracle, Predictor
from prescope.routing.trace import Trace
from prescope.sim.simulator import replay

MS = 1e-3
NEW = ("hybrid", "lookahead_prefetch", "activation_matrix", "prescope", "oracle")
PREDICTED = ("hybrid", "lookahead_prefetch", "prescope")  # given the gate lookahead in the engine


def layout(L: int, E: int, K: int, expert_bytes: int = 1_000_000) -> ModelLayout:
    return ModelLayout("ToyMoeForCausalLM", "toy", L, tuple(range(L)), (), E, K, 8, 8, "float32",
                               expert_bytes)


class Fixed(Predictor):
    """Scores set by the test: scores[(layer, distance)] is a list over E (one token)."""

    name = "fixed"

    def __init__(self, lay: ModelLayout, scores: dict, max_distance: int | None = None):
        self.layout, self.scores, self.max_distance = lay, scores, max_distance

    def predict(self, layer, distance, *, hidden=None, history=None):
        self._target(layer, distance)
        row = self.scores.get((layer, distance), [0.0] * self.layout.num_experts)
        return torch.tensor([row], dtype=torch.float32)  # [1, E]


def cache_with(S: int, L: int, keys) -> ExpertCache:
    cache = ExpertCache(S, L)
    for slot, key in enumerate(keys):
        cache.assign(key, slot, speculative=False)
        cache.mark_ready(key)
    return cache


def view(layer, experts, L=4, E=8, future=None, step=0, tokens=None):
    return LayerView(step, layer, L, E, tuple(experts), tuple(tokens or [1] * len(experts)), None, future)


COSTS = Costs(load=1.0, gpu=lambda n: 0.5, cpu=lambda n: 2.0)  # loading a miss (1.5) beats the CPU (2.0)


def test_registered_by_name_with_their_models():
    for name in NEW:
        policy = make_policy(name)
        assert policy.name == name and policy.imitates and policy.simplifies
    assert make_policy("prescope").async_io is True
    assert make_policy("prescope").host_work == ("predict", "plan")
    assert set(NEW) <= set(POLICIES)


# ---- each policy on synthetic views --------------------------------------------------------------------------

def test_oracle_prefetches_exactly_the_future_in_order_of_use():
    policy = make_policy("oracle")
    cache = cache_with(32, 4, [(2, 3)])
    policy.reset(cache, 8, COSTS)
    future = ((1, 2), (3, 4), (5, 6))
    orders = policy.plan(view(0, [0, 7], future=future), cache)
    orders.check(view(0, [0, 7]))
    assert orders.prefetch == [(1, 1), (1, 2), (2, 4), (3, 5), (3, 6)]  # (2, 3) is resident
    # two misses: loading both ends the GPU at 2.5, loading one and running one on the CPU at max(1.5, 2)
    assert (orders.gpu, orders.cpu) == ([0], [7])


def test_oracle_evicts_the_key_used_farthest_ahead_and_never_one_needed_sooner():
    """L = 4, running layer 1. Held: (2, 5) used next layer; (3, 1) used in 2 layers; (0, 4) and (1, 6) not this
    step, so next step at their own layer: 4 − 1 + 0 = 3 and 4 − 1 + 1 = 4 layers ahead."""
    policy = make_policy("oracle")
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


def test_oracle_without_the_future_plans_on_demand_and_says_so():
    policy = make_policy("oracle")
    cache = cache_with(8, 4, [])
    policy.reset(cache, 8, COSTS)
    with pytest.warns(RuntimeWarning, match="no LayerView.future"):
        orders = policy.plan(view(0, [1, 2]), cache)
    assert (orders.gpu, orders.cpu, orders.prefetch) == ([1, 2], [], [])


def test_lookahead_prefetches_the_next_layers_predicted_top_k():
    lay = layout(4, 8, 2)
    scores = {(1, 1): [0.0, 0.1, 0.9, 0.0, 0.5, 0.2, 0.0, 0.3]}
    policy = make_policy("lookahead_prefetch", predictor=Fixed(lay, scores))
    cache = cache_with(16, 4, [(2, 4)])
    policy.reset(cache, 8, COSTS)
    orders = policy.plan(view(1, [3, 5]), cache)
    assert orders.prefetch == [(2, 2)]  # the top 2 are experts 2 and 4; (2, 4) is already there
    assert (orders.gpu, orders.cpu) == ([3, 5], [])
    cache2 = cache_with(16, 4, [])
    policy.reset(cache2, 8, COSTS)
    assert policy.plan(view(1, [3, 5]), cache2).prefetch == [(2, 2), (2, 4)]
    assert policy.plan(view(3, [0, 1]), cache2).prefetch == []  # the last layer has nothing ahead


def test_hybrid_splits_misses_by_cost_and_prefetches_the_next_layer():
    """Expert 2 resident, 4 and 6 missing; τ = 1, GPU 0.5. Loading both ends the GPU at 2.5 (they land at 1
    and 2); loading one: GPU 1.5, CPU one expert; loading none: GPU 0.5, CPU two experts."""
    lay = layout(4, 8, 2)
    scores = {(0, 1): [0.9, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]}
    for cpu_s, gpu, cpu in ((5.0, [2, 4, 6], []), (2.0, [2, 4], [6]), (0.3, [2], [4, 6])):
        policy = make_policy("hybrid", predictor=Fixed(lay, scores))
        cache = cache_with(16, 4, [(0, 2)])
        policy.reset(cache, 8, Costs(1.0, lambda n: 0.5, lambda n, c=cpu_s: c))
        orders = policy.plan(view(0, [2, 4, 6]), cache)
        assert (orders.gpu, orders.cpu) == (gpu, cpu), cpu_s
        assert orders.prefetch == [(1, 0), (1, 1)]


def test_activation_matrix_ranks_by_activation_with_layer_decay_and_evicts_the_least_active():
    """Without a fitted matrix the policy uses this run's decayed activation frequencies: after steps that
    routed expert 1 at layer 1, expert 2 at layer 2 and expert 3 at layer 3 every time, the priorities are
    f·(1 − d/L) for d = 1, 2, 3, nearest first."""
    policy = make_policy("activation_matrix", max_prefetch=3)
    cache = cache_with(8, 4, [(0, 0), (1, 1), (2, 2), (3, 3)])
    policy.reset(cache, 8, None)
    for step in range(3):
        for layer in range(4):
            policy.plan(view(layer, [layer], step=step), cache)
    for key in [(1, 1), (2, 2), (3, 3)]:
        cache.evict(key)
    orders = policy.plan(view(0, [0], step=3), cache)
    freq = 1 - 0.8 ** 3  # three steps of a decay-0.8 average
    assert policy.priority == pytest.approx({(1, 1): freq * 0.75, (2, 2): freq * 0.5, (3, 3): freq * 0.25})
    assert orders.prefetch == [(1, 1), (2, 2), (3, 3)]
    full = cache_with(4, 4, [(0, 0), (1, 1), (2, 2), (3, 3)])
    assert policy.plan(view(0, [0], step=4), full).prefetch == []  # all predicted experts are there
    assert full.owner(policy.victim(full, (1, 5))) == (3, 3)  # lowest priority; (0, 0) is the running layer's


def test_prescope_orders_and_victims_follow_presched():
    """The policy hands PreSched its view of the cache and executes the plan: same split, same prefetches in
    the same order, and its victim() gives up exactly the planned keys."""
    lay = layout(4, 8, 2)
    scores = {(0, 1): [0.9, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.8], (0, 2): [0.0, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
              (0, 3): [0.0, 0.0, 0.0, 0.6, 0.0, 0.0, 0.0, 0.0]}
    policy = make_policy("prescope", predictor=Fixed(lay, scores), layer_gap_s=2.0)
    cache = cache_with(4, 4, [(0, 1), (3, 5), (2, 6), (1, 4)])
    policy.reset(cache, 8, COSTS)
    v = view(0, [1, 2])
    inst = policy.instance(v, cache)
    want = presched.plan(inst)
    orders = policy.plan(v, cache)
    orders.check(v)
    assert (orders.gpu, orders.cpu, orders.prefetch) == (list(want.gpu), list(want.cpu), list(want.prefetch))
    assert want.prefetch, "the case must prefetch something"
    for key, victim in zip([(0, e) for e in want.loads] + list(want.prefetch), want.victims, strict=True):
        slot = policy.victim(cache, key)
        assert (cache.owner(slot) if victim is not None else None) == victim
        cache.assign(key, slot, speculative=key[0] != 0)
        cache.mark_ready(key)


def test_setup_errors_are_clear():
    lay = layout(3, 8, 2)
    policy = make_policy("prescope", predictor=Fixed(lay, {}))
    with pytest.raises(peers.PolicyError, match="3 MoE layers and 8 experts, but this model has 4 MoE layers"):
        policy.reset(cache_with(8, 4, []), 8, COSTS)
    with pytest.raises(peers.PolicyError, match="lookahead 4 reaches past the model's 4 MoE layers"):
        make_policy("lookahead_prefetch", lookahead=4).reset(cache_with(8, 4, []), 8, COSTS)
    trained = Fixed(layout(4, 8, 2), {}, max_distance=1)
    with pytest.raises(peers.PolicyError, match="lookahead 3 exceeds the 1 layers"):
        make_policy("prescope", predictor=trained).reset(cache_with(8, 4, []), 8, COSTS)
    with pytest.raises(peers.PolicyError, match="lookahead must be >= 1"):
        make_policy("hybrid", lookahead=0)
    factory_policy = make_policy("prescope", predictor=lambda: Fixed(layout(4, 8, 2), {}))
    factory_policy.reset(cache_with(8, 4, []), 8, COSTS)
    assert isinstance(factory_policy.predictor, Fixed)


def test_every_order_places_each_routed_expert_once_and_every_victim_is_legal():
    rng = random.Random(3)
    L, E, K = 4, 8, 2
    lay = layout(L, E, K)
    for _ in range(40):
        S = rng.randint(4, L * E)  # at least the most experts a layer routes here
        scores = {(at, d): [rng.random() for _ in range(E)] for at in range(L) for d in range(1, L)}
        for name in NEW:
            options = {} if name == "oracle" else {"predictor": Fixed(lay, scores)}
            policy = make_policy(name, **options)
            cache = ExpertCache(S, L)
            load, cpu_s = rng.uniform(0.2, 2), rng.uniform(0.2, 3)
            policy.reset(cache, E, Costs(load, lambda n: 0.5, lambda n, c=cpu_s: c))
            for step in range(3):
                routing = [tuple(rng.sample(range(E), rng.randint(1, 4))) for _ in range(L)]
                for layer in range(L):
                    v = LayerView(step, layer, L, E, routing[layer], (1,) * len(routing[layer]), None,
                                  tuple(routing[layer + 1:]))
                    orders = policy.plan(v, cache)
                    orders.check(v)
                    assert len(set(orders.prefetch)) == len(orders.prefetch)
                    assert all(layer < k[0] < L for k in orders.prefetch), (name, orders.prefetch)
                    execute(policy, cache, layer, orders)


def execute(policy, cache: ExpertCache, layer: int, orders) -> None:
    """What an executor does with orders (present pinned, misses loaded, prefetches until no slot); the
    routed experts fit the pool here, so there are no waves."""
    for e in orders.gpu:
        if cache.is_present((layer, e)):
            cache.mark_ready((layer, e))
            cache.pin((layer, e))
    for e in orders.gpu:
        key = (layer, e)
        if not cache.is_present(key):
            slot = policy.victim(cache, key)
            assert slot is not None and not cache.is_pinned(slot), f"{policy.name}: no slot for a miss"
            cache.assign(key, slot, speculative=False)
            cache.mark_ready(key)
            cache.pin(key)
        cache.use(key, hit=True)
    for key in orders.prefetch:
        if cache.is_present(key):
            continue
        slot = policy.victim(cache, key)
        if slot is None:
            break
        assert not cache.is_pinned(slot) and cache.owner(slot) not in {(layer, e) for e in orders.gpu}
        cache.assign(key, slot, speculative=True)
        cache.mark_ready(key)  # as the engine does: kernels wait on the copy's event, not the cache
    cache.unpin_all()


# ---- replays ---------------------------------------------------------------------------------------------

def hand_profile() -> HardwareProfile:
    """A 1 GB/s link (1 ms per 1 MB expert), 0.5 ms per GPU expert, 2 ms per CPU expert, 0.1 ms of attention
    and 0.25 ms of host work per layer; every other rate negligible."""
    fast = dict(mem_gbps=NEGLIGIBLE_RATE, tflops=NEGLIGIBLE_RATE)
    link = BandwidthCurve(((1.0, 1.0),))
    return HardwareProfile(
        name="hand", description="hand test profile", source="published", citation="tests", gpu="test gpu",
        cpu="test cpu", date="2026-11-28", pinned_h2d=link, pageable_h2d=link, transfer_latency_s=0.0,
        gpu_expert=ComputeModel(0.5 * MS, **fast), gpu_dense=ComputeModel(0.1 * MS, **fast),
        cpu_expert={"float32": ComputeModel(2 * MS, **fast)}, host_overhead_per_layer_s=0.25 * MS,
        predict_overhead_s=0.0, plan_overhead_s=0.0)


def synthetic_trace(L=4, E=8, K=2, prompts=2, tokens=30, reuse=0.5, seed=0) -> Trace:
    """Decode-only routing where each layer keeps the previous token's experts with probability `reuse`."""
    rng = np.random.default_rng(seed)
    rows, experts = [], []
    for p in range(prompts):
        prev = [rng.choice(E, K, replace=False) for _ in range(L)]
        for t in range(tokens):
            prev = [x if rng.random() < reuse else rng.choice(E, K, replace=False) for x in prev]
            experts.append(np.stack(prev))
            rows.append(dict(prompt=p, row=0, position=10 + t, step=t + 1, call=p, phase="decode", domain=""))
    weights = np.broadcast_to(np.linspace(1.0, 0.5, K, dtype=np.float32), (len(rows), L, K)).copy()
    return Trace(layout(L, E, K), pd.DataFrame(rows), np.asarray(experts, dtype=np.int64), weights)


def test_replay_ranks_the_oracle_first_and_prescope_with_the_true_routing_close_to_it():
    trace, profile = synthetic_trace(), hand_profile()
    gap = (0.1 + 0.25) * MS  # attention + host work between two MoE layers, as the simulator times them
    def run(policy, slots):
        return replay(trace, policy, profile, budget_slots=slots,
                      async_io=getattr(policy, "async_io", False)).totals["mean_token_latency_s"]

    for slots in (6, 12):
        lru = run(make_policy("on_demand_lru"), slots)
        oracle = run(make_policy("oracle"), slots)
        ours = run(make_policy("prescope", predictor=Oracle(trace.layout), layer_gap_s=gap), slots)
        print(f"slots={slots}: on_demand_lru {lru / MS:.3f} ms, oracle {oracle / MS:.3f} ms, "
              f"prescope+oracle predictor {ours / MS:.3f} ms per token")
        assert oracle <= lru
        assert ours <= 1.1 * oracle


# ---- inside the real engine ------------------------------------------------------------------------------

GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", [*NEW, "prescope[gate=False]"])
def test_engine_generates_the_stock_tokens(name, tmp_path):
    """Greedy generation through the engine gives the stock tokens, with the link winning (the hand profile:
    misses load, prefetches run, except where prescope's gate finds a layer host-bound) and with the CPU
    winning (h200 on these tiny experts: misses on the CPU, except for gated prescope, which finds the host
    the bottleneck and runs them on the GPU)."""
    spec = parse_policy(name)
    name, variant = spec.name, spec.options
    stock = tiny_model("olmoe", seed=4)
    torch.manual_seed(5)
    ids = torch.randint(1, 96, (2, 5))
    want = stock.generate(ids, **GEN)
    lay = adapter.describe(stock)
    link_wins = str(save_profile(hand_profile(), tmp_path / "hand.json"))
    runs = [(link_wins, dict(budget_bytes=lay.top_k * lay.expert_bytes)), (link_wins, dict(budget_share=0.5)),
            ("h200", dict(budget_share=0.5))]
    for profile, budget in runs:
        model = copy.deepcopy(stock)
        options = {"predictor": GateLookahead.from_model(model)} if name in PREDICTED else {}
        options |= variant
        engine = Engine(model, EngineConfig(device="cpu", profile=profile, **budget), policy=make_policy(name, **options))
        with engine, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "oracle: this executor gives no", RuntimeWarning)
            got = model.generate(ids, **GEN)
        assert torch.equal(got, want), f"{name} {profile} {budget}: tokens differ"
        on_cpu = sum(r[0] == "cpu" and r[4] == "cpu_expert" for r in engine.records.rows)
        stats = engine.cache.stats
        if profile == link_wins:
            assert stats.loads > 0
            gated = name == "prescope" and variant.get("gate", True)
            assert stats.prefetches > 0 or name == "oracle" or "budget_bytes" in budget or gated
        elif name == "hybrid":
            assert on_cpu > 0
        elif name == "prescope" and variant.get("gate", True):  # host-bound under h200: on demand, on the GPU
            assert engine.policy.lean > 0 and on_cpu == 0
        elif name == "prescope":
            assert on_cpu > 0


def test_prescope_keeps_window_keys_that_reuse_asks_for_unless_told_not_to():
    """Layer 1's expert 3 ran last step; the predictor rates it 0 for this step. With window_reuse (the
    default) its chance as a victim is what the memory saw, not 0; without, the prediction alone."""
    L, E = 4, 8
    chances = {}
    for reuse in (True, False):
        scores = {(0, 1): [0.0 if e == 3 else 1.0 for e in range(E)]}
        policy = make_policy("prescope", predictor=Fixed(layout(L, E, 2), scores), window_reuse=reuse, layer_gap_s=2.0)
        cache = cache_with(8, L, [(1, 3)])
        policy.reset(cache, E, COSTS)
        for step in range(3):  # layer 1 routes expert 3 every step
            for layer in range(L):
                v = LayerView(step, layer, L, E, (3,) if layer == 1 else (layer,), (1,), None, None)
                if step == 2 and layer == 0:
                    inst = policy.instance(v, cache)
                    chances[reuse] = {h.key: h.prob for h in inst.evictable}.get((1, 3))
                execute(policy, cache, layer, policy.plan(v, cache))
    assert chances[False] == 0.0 and chances[True] > 0.5, chances


def test_prescope_asks_for_asyncio_only_where_a_transfer_is_long():
    """AsyncIO's thread pays where an on-demand load would wait long behind prefetches (large experts) and
    costs a host-bound loop more than it saves with small ones; the engine follows the policy's choice."""
    long, short = Costs(6.6e-3, lambda n: 1e-4, lambda n: 1e-2), Costs(2e-4, lambda n: 3e-5, lambda n: 4e-4)
    prescope = make_policy("prescope")
    assert prescope.uses_async_io(long) and not prescope.uses_async_io(short) and prescope.uses_async_io(None)
    assert make_policy("oracle").uses_async_io(short) and not make_policy("on_demand_lru").uses_async_io(long)
    model = tiny_model("mixtral")
    with Engine(model, EngineConfig(policy="prescope", budget_share=0.5)) as engine:
        assert (engine.io is not None) == engine.policy.uses_async_io(engine.costs)
    with Engine(model, EngineConfig(policy="prescope", budget_share=0.5, async_io=True)) as engine:
        assert engine.io is not None


def test_prescope_skips_only_plans_that_presched_would_leave_empty():
    """When every routed expert is resident and no window candidate is absent, the policy returns without
    building the plan; PreSched's plan of the same instance must then be exactly those orders."""
    rng = random.Random(11)
    L, E, K = 4, 8, 2
    lay = layout(L, E, K)
    skipped = 0
    for _ in range(30):
        hot = [rng.sample(range(E), 3) for _ in range(L)]  # each layer routes among 3 experts, predicted so
        scores = {(at, d): [1.0 if e in hot[at + d] else 0.0 for e in range(E)] for at in range(L) for d in range(1, L)
                  if at + d < L}
        policy = make_policy("prescope", predictor=Fixed(lay, scores), layer_gap_s=1.0)
        cache = ExpertCache(L * E // 2, L)
        policy.reset(cache, E, COSTS)
        for step in range(4):
            for layer in range(L):
                routed = tuple(rng.sample(hot[layer], K))
                v = LayerView(step, layer, L, E, routed, (1,) * K, None, None)
                forecast = policy.window_forecast(v)
                if policy.nothing_to_plan(v, cache, forecast):
                    want = presched.plan(policy.instance(v, cache, forecast))
                    before = policy.skipped
                    orders = policy.plan(v, cache)
                    assert policy.skipped == before + 1
                    assert (orders.gpu, orders.cpu, orders.prefetch) == (list(want.gpu), [], []) and not want.loads
                    skipped += 1
                else:
                    orders = policy.plan(v, cache)
                execute(policy, cache, layer, orders)
    assert skipped > 50  # the case must occur often enough to mean something


class Refusing(Fixed):
    """A predictor that fails the test if the policy asks it anything."""

    def predict(self, layer, distance, *, hidden=None, history=None):
        raise AssertionError("the gate should have skipped prediction")


def test_prescope_gate_counts_on_demand_work_against_the_host():
    """device_slack = routed experts' GPU time + a load per expert absent or only prefetched (not used yet),
    minus the host's time per layer and the host time of those loads."""
    policy = make_policy("prescope", predictor=Fixed(layout(4, 8, 2), {}), transfer_host_s=0.1)
    cache = cache_with(4, 4, [(0, 2)])
    cache.assign((0, 1), 1, speculative=True)  # prefetched, landed, not used yet: a miss without prefetching
    cache.mark_ready((0, 1))
    cache.assign((0, 4), 2, speculative=False)  # still loading
    policy.reset(cache, 8, Costs(load=1.0, gpu=lambda n: 0.5 * n, cpu=lambda n: 2.0, host=0.25, launch=0.2, plan=0.3))
    v = view(0, [1, 2, 3, 4], tokens=[2, 1, 1, 1])
    slack = (2.5 + 3 * 1.0) - (0.25 + 4 * 0.2 + 3 * 0.1)  # the host launches all four routed experts
    assert policy.device_slack(v, cache) == pytest.approx(slack)
    assert policy.speculation_pays(v, cache)  # 4.15 s over the host, more than planning's 0.3 s
    policy.reset(cache, 8, Costs(load=1.0, gpu=lambda n: 0.5 * n, cpu=lambda n: 2.0, host=0.25, launch=0.2,
                                 plan=slack + 0.01))
    assert not policy.speculation_pays(v, cache)  # planning would cost more than the device's excess


def test_prescope_gate_runs_host_bound_layers_on_demand_without_predicting():
    """Where the host's time per layer exceeds the device's on-demand work, PreScope neither predicts nor
    plans: routed experts on the GPU on demand (a CPU expert would cost the host, the bottleneck), no prefetch; where the device is the bottleneck it
    plans as before; the running slack restarts when the step's shape changes (prefill -> decode)."""
    lay = layout(4, 8, 2)
    lean = make_policy("prescope", predictor=Refusing(lay, {}))
    cache = cache_with(8, 4, [])
    lean.reset(cache, 8, Costs(load=1.0, gpu=lambda n: 0.5, cpu=lambda n: 0.01, host=10.0))  # the CPU looks free
    for layer in range(3):
        orders = lean.plan(view(layer, [1, 2]), cache)
        assert (orders.gpu, orders.cpu, orders.prefetch) == ([1, 2], [], [])
        execute(lean, cache, layer, orders)
    assert lean.lean == 3 and lean.skipped == 0 and lean.planned_work() == ()  # the simulator charges no planning
    full = cache_with(4, 4, [(0, 5), (1, 5), (3, 1), (3, 6)])
    for slot in (0, 2, 3, 1):
        full.use(full.owner(slot), hit=True)  # slot 0 (layer 0) used longest ago
    lean.plan(view(3, [2, 4]), full)
    assert lean.victim(full, (3, 2)) == base.lru_victim(full, (3, 2), set()) == 2  # the layer's own LRU slot

    scores = {(0, 1): [0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9]}
    busy = make_policy("prescope", predictor=Fixed(lay, scores))
    for host, lean_layers in ((0.0, 0), (10.0, 1)):
        cache = cache_with(8, 4, [])
        busy.reset(cache, 8, Costs(load=1.0, gpu=lambda n: 0.5, cpu=lambda n: 2.0, host=host))
        orders = busy.plan(view(0, [1, 2]), cache)
        assert bool(orders.prefetch) == (host == 0.0) and busy.lean == lean_layers
        assert busy.planned_work() == (("predict", "plan") if host == 0.0 else ())

    shaped = make_policy("prescope", predictor=Fixed(lay, scores))
    cache = cache_with(8, 4, [])
    shaped.reset(cache, 8, Costs(load=1.0, gpu=lambda n: 0.5 * n, cpu=lambda n: 100.0, host=3.0))
    assert shaped.speculation_pays(view(0, [1, 2], tokens=[40, 40]), cache)  # prefill: 40 tokens each
    assert not shaped.speculation_pays(view(1, [1, 2]), cache)  # decode: a new shape, judged on its own
    ungated = make_policy("prescope", predictor=Fixed(lay, scores), gate=False)
    ungated.reset(cache_with(8, 4, []), 8, Costs(load=1.0, gpu=lambda n: 0.5, cpu=lambda n: 2.0, host=10.0))
    assert ungated.plan(view(0, [1, 2]), cache_with(8, 4, [])).prefetch and ungated.lean == 0
