"""PreScope's `late_prefetch`: off, every decision as before; on, `plan` orders only the running layer and
`plan_ahead` the window's prefetches, the engine's tokens stay the stock model's, the simulator replays a real
trace with every routed expert computed once, and the gate counts only the planning its kernels do not hide."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import GEN, assert_generation_equal, stock_padded_run
from test_peers import Fixed, cache_with, layout, view

from prescope.config import EngineConfig
from prescope.data import shipped
from prescope.engine.engine import Engine
from prescope.experiments.planspeed import replay_decisions
from prescope.hardware.profiles import load_profile
from prescope.models import adapter
from prescope.policies import make_policy, parse_policy
from prescope.policies.base import Costs, LayerView
from prescope.policies.lateplan import early_forecast, unhidden
from prescope.routing.reader import read_trace
from prescope.sim.simulator import replay, replay_steps

LATE = "prescope[gate=False,late_prefetch=True]"
PROFILE = "h200"


@pytest.fixture(scope="module")
def qwen3():
    return read_trace(shipped("routing", "qwen3-30b-a3b.route.csv.xz"), max_decode_steps=6)


def test_the_option_off_decides_exactly_as_without_it(qwen3):
    """`late_prefetch=False` is the default: every order and named victim of prescope and ceiling replaying the
    Qwen3 trace has the same digest as the policy without the option (whose digest tests/experiments/
    test_planspeed.py pins to the recorded one)."""
    plain = ("prescope[gate=False]", "ceiling[gate=False]", "prescope")
    off = tuple(p.replace("]", ",late_prefetch=False]") if "[" in p else p + "[late_prefetch=False]" for p in plain)
    a = replay_decisions(qwen3, plain, batches=(1, 4), steps=3)
    b = replay_decisions(qwen3, off, batches=(1, 4), steps=3)
    assert [r["digest"] for r in a] == [r["digest"] for r in b]
    assert all(r["plans"] > 0 for r in a)


def _recording(policy):
    """`policy` with its plan and plan_ahead results recorded per (step, layer)."""
    plans, ahead = {}, {}
    plan, plan_ahead = policy.plan, policy.plan_ahead

    def recorded_plan(v, cache):
        orders = plan(v, cache)
        plans[v.step, v.layer] = (list(orders.gpu), list(orders.cpu), list(orders.prefetch))
        return orders

    def recorded_ahead(v, cache):
        keys = plan_ahead(v, cache)
        ahead[v.step, v.layer] = list(keys)
        return keys

    policy.plan, policy.plan_ahead = recorded_plan, recorded_ahead
    return plans, ahead


@pytest.mark.parametrize("spec", ["ceiling[gate=False,late_prefetch=True]", LATE, "prescope[late_prefetch=True]"])
@pytest.mark.parametrize("batch", [1, 4])
def test_the_simulator_replays_a_real_trace_with_every_routed_expert_computed_once(qwen3, spec, batch):
    from prescope.routing.segments import decode_segments

    trace = decode_segments(qwen3, batch) if batch > 1 else qwen3
    policy = parse_policy(spec).build()
    plans, ahead = _recording(policy)
    r = replay(trace, policy, PROFILE, budget_share=0.25, batch_size=batch, max_steps=4)
    tl = r.timeline
    done = tl[tl["kind"].isin(["gpu_expert", "cpu_expert"])]
    assert not done.duplicated(["step", "layer", "expert"]).any()
    routed = set()
    for step, (_, _, _, index) in enumerate(replay_steps(trace, batch, max_steps=4)):
        for layer in range(trace.layout.num_moe_layers):
            routed |= {(step, layer, int(e)) for e in np.unique(trace.experts[index, layer]) if e >= 0}
    assert set(zip(done["step"], done["layer"], done["expert"], strict=True)) == routed
    # plan orders the running layer only; the prefetches come from plan_ahead
    assert plans and all(not prefetch for _, _, prefetch in plans.values())
    assert set(ahead) == set(plans)
    if spec.startswith("ceiling"):  # the true future: some prefetches issued, and used
        assert sum(map(len, ahead.values())) > 0 and r.totals["loads_prefetched"] > 0
        assert r.summary["prefetches_used"].sum() > 0


def _overlapping(timeline) -> int:
    """Layers whose first GPU expert starts before their planning row ends (the planning overlaps the kernels)."""
    plan_end = timeline[timeline["kind"] == "plan"].set_index(["step", "layer"])["end"]
    first = timeline[timeline["kind"] == "gpu_expert"].groupby(["step", "layer"])["start"].min()
    return sum(first[k] < plan_end[k] - 1e-12 for k in plan_end.index if k in first.index)


def test_planning_ahead_overlaps_the_layers_kernels_in_the_simulator(qwen3):
    """With the option off a layer's kernels start after its planning row ends; with it on the planning row
    starts once the layer's work was issued, and at layers that plan the window the kernels run beside it."""
    profile = dataclasses.replace(load_profile(PROFILE), plan_overhead_s=0.4e-3)  # as the H200 engine measured it
    run = {spec: replay(qwen3, parse_policy(spec).build(), profile, budget_share=0.25, max_steps=2).timeline
           for spec in ("ceiling[gate=False]", "ceiling[gate=False,late_prefetch=True]")}
    off, on = run.values()
    assert (off["kind"] == "plan").sum() > 0 and (on["kind"] == "plan").sum() > 0
    assert _overlapping(off) == 0 and _overlapping(on) > 0


class _Hidden(Fixed):
    needs_hidden = True


def test_with_the_option_the_gate_counts_only_what_the_kernels_do_not_hide():
    costs = Costs(load=0.3, gpu=lambda n: 0.01, cpu=lambda n: 5.0, layer_gap=0.24, host=0.04, plan=0.5,
                  predict=0.1, wave=0.05, transfer_host=0.15)
    cache = cache_with(16, 8, [(0, 1)])
    v = view(0, [1, 2, 3], L=8)
    history = make_policy("prescope", lookahead=3, late_prefetch=True)
    history.reset(cache, 8, costs)
    # no hidden-state predictor: the whole P runs after the launch; the kernels hide 3·0.01 + 0.05
    assert unhidden(history, v, 0.5) == pytest.approx(0.5 - 0.08)
    assert unhidden(history, v, 0.05) == 0.0
    plain = make_policy("prescope", lookahead=3)
    plain.reset(cache, 8, costs)
    assert history.plan_gain(v, cache) == pytest.approx(plain.plan_gain(v, cache) + 0.08)
    # a predictor of hidden states keeps its forecast (P's prediction part) before the launch
    hidden = make_policy("prescope", predictor=_Hidden(layout(8, 8, 2), {}), lookahead=3,
                         late_prefetch=True)
    hidden.reset(cache, 8, costs)
    assert unhidden(hidden, v, 0.5) == pytest.approx(0.1 + 0.4 - 0.08)
    assert unhidden(hidden, v, 0.05) == pytest.approx(0.05)


def link_bound(layout, profile) -> Costs:
    """Costs under which a tiny model's misses load (the CPU is far slower than the link) and a prefetch lands in
    time for its layer (the work between two MoE layers takes five transfers)."""
    return Costs(load=1e-3, gpu=lambda n: 1e-4, cpu=lambda n: 1.0, layer_gap=5e-3, host=1e-5)


def _offloaded_against_stock(arch: str, spec: str, budgets) -> int:
    """Generate with `spec` through the CPU engine at each budget; the tokens and logits must be the stock
    model's. Returns the prefetches the engine issued."""
    stock, ids, mask, ref = stock_padded_run(arch)
    lay = adapter.describe(stock)
    prefetched = 0
    for budget in budgets(lay):
        model, parsed = copy.deepcopy(stock), parse_policy(spec)
        with Engine(model, EngineConfig(policy=parsed.name, device="cpu", **budget), policy=parsed.build()) as engine:
            out = model.generate(ids, attention_mask=mask, **GEN)
            prefetched += engine.cache.stats.prefetches
        assert_generation_equal(out, ref, f"{arch}/{spec}/{budget}")
        assert sum(engine.records.plan_seconds) > 0
    return prefetched


def _smallest_and_half(lay) -> list[dict]:
    return [dict(budget_bytes=lay.top_k * lay.expert_bytes), dict(budget_share=0.5)]


@pytest.mark.parametrize("spec", [LATE, "ceiling[gate=False,late_prefetch=True]"])
def test_offloaded_generate_with_late_prefetch_equals_stock(arch, spec, monkeypatch):
    """The CPU engine with the option gives the stock model's tokens and logits at the smallest budget and at
    half, with costs that load misses and may prefetch (tiny experts would otherwise all run on the CPU)."""
    from prescope.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "costs_for", link_bound)
    _offloaded_against_stock(arch, spec, _smallest_and_half)


def test_the_engine_issues_what_plan_ahead_returns(monkeypatch):
    """Mixtral at half and three quarters of the experts: plan_ahead's prefetches are issued (the tokens stay the
    stock's)."""
    from prescope.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "costs_for", link_bound)
    assert _offloaded_against_stock("mixtral", LATE, lambda lay: [dict(budget_share=0.5), dict(budget_share=0.75)]) > 0


def test_a_hidden_state_forecast_stays_before_the_launch_and_the_rest_moves_after_it():
    """With a predictor of hidden states the forecast is taken in `plan` (its read would otherwise wait for the
    layer's kernels): the executor charges prediction before the launch and planning after it; without one,
    both after it."""
    costs = Costs(load=0.1, gpu=lambda n: 0.1, cpu=lambda n: 5.0, layer_gap=0.5, host=0.01, plan=0.5, predict=0.1)
    scores = {(0, 1): [0.0, 0.0, 0.0, 9.0, 9.0, 0.0, 0.0, 0.0]}
    for predictor, before, after in ((_Hidden(layout(4, 8, 2), scores), ("predict",), ("plan",)),
                                     (None, (), ("predict", "plan"))):
        cache = cache_with(16, 4, [(0, 1)])
        policy = make_policy("prescope", predictor=predictor, lookahead=1, gate=False, late_prefetch=True)
        policy.reset(cache, 8, costs)
        v = LayerView(0, 0, 4, 8, (1, 2), (1, 1), torch.zeros(1, 8), None)
        orders = policy.plan(v, cache)
        assert sorted(orders.gpu + orders.cpu) == [1, 2] and orders.prefetch == []
        assert policy.planned_work() == before and policy.planned_ahead_work() == ()
        ahead = policy.plan_ahead(v, cache)
        assert policy.planned_ahead_work() == after
        if predictor is not None:  # experts 3 and 4 of layer 1 predicted for sure: prefetched
            assert sorted(ahead) == [(1, 3), (1, 4)]


def test_a_forecast_is_taken_before_the_launch_only_where_the_device_computes_it():
    class OnGpu(Fixed):
        device = "cuda:0"

    cases = ((None, False), (Fixed(layout(4, 8, 2), {}), False), (_Hidden(layout(4, 8, 2), {}), True),
             (OnGpu(layout(4, 8, 2), {}), True))
    for predictor, early in cases:
        policy = make_policy("prescope", predictor=predictor, lookahead=1, late_prefetch=True)
        policy.reset(cache_with(16, 4, []), 8, None)
        assert early_forecast(policy) is early
