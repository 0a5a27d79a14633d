"""The simulated executor: hand-computed timelines, policy comparisons, link disciplines, invariants over random
traces, the CLI, the real-computation mode and a speed benchmark at prescope-tiny's topology."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from conftest import DATA, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from prescope import cli, files, timeline
from prescope.hardware.cost import cpu_expert_time
from prescope.hardware.profiles import (
    NEGLIGIBLE_RATE,
    BandwidthCurve,
    ComputeModel,
    HardwareProfile,
    load_profile,
)
from prescope.layout import ModelLayout
from prescope.policies import POLICIES
from prescope.policies.base import Orders, Policy
from prescope.policies.protocol import BudgetError
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.trace import Trace, save_trace
from prescope.sim import simulator
from prescope.sim.simulator import SimulationError, replay, replay_steps

MS = 1e-3
EXPERT_BYTES = 1_000_000  # 1 ms over the hand profile's 1 GB/s link
ABS = 1e-12


def hand_profile(cpu_s: float = 2 * MS, host_s: float = 0.25 * MS, predict_s: float = 0.0,
                 plan_s: float = 0.0) -> HardwareProfile:
    """Round numbers: a 1 GB/s link with no latency, 0.5 ms per GPU expert, 0.1 ms of attention per layer,
    `cpu_s` per CPU expert, `host_s` of host work per MoE layer (every rate but those is negligible)."""
    fast = dict(mem_gbps=NEGLIGIBLE_RATE, tflops=NEGLIGIBLE_RATE)
    link = BandwidthCurve(((1.0, 1.0),))
    return HardwareProfile(
        name="hand", description="hand-computed test profile", source="published", citation="tests",
        gpu="test gpu", cpu="test cpu", date="2026-11-28", pinned_h2d=link, pageable_h2d=link,
        transfer_latency_s=0.0, gpu_expert=ComputeModel(0.5 * MS, **fast), gpu_dense=ComputeModel(0.1 * MS, **fast),
        cpu_expert={"float32": ComputeModel(cpu_s, **fast)}, host_overhead_per_layer_s=host_s,
        predict_overhead_s=predict_s, plan_overhead_s=plan_s)


def make_layout(L: int, E: int, K: int, expert_bytes: int = EXPERT_BYTES) -> ModelLayout:
    return ModelLayout("TestMoeForCausalLM", "test", L, tuple(range(L)), (), E, K, 8, 8, "float32", expert_bytes)


def make_trace(routes, E: int, expert_bytes: int = EXPERT_BYTES) -> Trace:
    """A decode-only trace from `routes[prompt][token][layer] = experts`, one generate() call per prompt."""
    arr = [np.asarray(r, dtype=np.int64) for r in routes]  # each [T, L, K]
    _, L, K = arr[0].shape
    tokens = pd.DataFrame([dict(prompt=p, row=0, position=10 + t, step=t + 1, call=p, phase="decode", domain="")
                           for p, r in enumerate(arr) for t in range(len(r))])
    experts = np.concatenate(arr)
    weights = np.broadcast_to(np.linspace(1.0, 0.5, K, dtype=np.float32), experts.shape).copy()
    return Trace(make_layout(L, E, K, expert_bytes), tokens, experts, weights)


def rows_of(result, step: int) -> list[tuple]:
    frame = result.timeline[result.timeline["step"] == step].sort_values(["start", "lane"], kind="stable")
    return [(r.lane, r.layer, r.expert, r.kind, round(r.start / MS, 9), round(r.end / MS, 9))
            for r in frame.itertuples()]


class GivenPrefetch(Policy):
    """Test policy: every routed expert on the GPU, and at layer l the prefetches `prefetch[l]`, in order."""

    name = "given_prefetch"

    def __init__(self, prefetch: dict[int, list[tuple[int, int]]]):
        self.prefetch = prefetch

    def plan(self, view, cache):
        return Orders(gpu=list(view.experts), prefetch=list(self.prefetch.get(view.layer, [])))


class MixedPolicy(Policy):
    """Test policy that exercises every path: the layer's least-routed expert on the CPU (when it routes
    more than one), the rest on the GPU, then the next layer's true experts and a wrong one prefetched."""

    name = "mixed_test"
    host_work = ("predict", "plan")

    def plan(self, view, cache):
        cpu = list(view.experts[-1:]) if len(view.experts) > 1 else []
        prefetch = []
        if view.future:
            nxt = view.future[0]
            prefetch = [(view.layer + 1, e) for e in nxt] + [(view.layer + 1, (max(nxt, default=0) + 1) % view.num_experts)]
        return Orders(gpu=[e for e in view.experts if e not in cpu], cpu=cpu, prefetch=prefetch)


# ---- hand-computed cases -----------------------------------------------------------------------------

TWO_STEPS = make_trace([[[[0], [1]], [[0], [2]]]], E=4)  # layer 0: expert 0 twice; layer 1: expert 1 then 2


def test_on_demand_lru_by_hand():
    r = replay(TWO_STEPS, "on_demand_lru", hand_profile(), budget_slots=2)
    assert rows_of(r, 0) == [
        ("gpu", 0, -1, "attention", 0.0, 0.1), ("cpu", 0, -1, "host", 0.1, 0.35),
        ("pcie", 0, 0, "on_demand", 0.35, 1.35), ("gpu", 0, 0, "gpu_expert", 1.35, 1.85),
        ("gpu", 1, -1, "attention", 1.85, 1.95), ("cpu", 1, -1, "host", 1.95, 2.2),
        ("pcie", 1, 1, "on_demand", 2.2, 3.2), ("gpu", 1, 1, "gpu_expert", 3.2, 3.7)]
    # step 1: expert (0, 0) hits; (1, 2) evicts (1, 1) from the layer's only slot
    assert rows_of(r, 1)[2] == ("gpu", 0, 0, "gpu_expert", 4.05, 4.55)
    assert rows_of(r, 1)[-2:] == [("pcie", 1, 2, "on_demand", 4.9, 5.9), ("gpu", 1, 2, "gpu_expert", 5.9, 6.4)]
    s = r.summary
    assert s["latency"].to_numpy() / MS == pytest.approx([3.7, 2.7], abs=1e-9)
    assert s[["hits", "misses", "loads_on_demand", "evictions"]].values.tolist() == [[0, 2, 2, 0], [1, 1, 1, 1]]
    assert s["bytes"].tolist() == [2 * EXPERT_BYTES, EXPERT_BYTES]
    assert r.timeline.attrs["source"] == "simulated" and r.timeline.attrs["profile"] == "hand"
    t = r.totals
    assert (t["steps"], t["tokens"], t["bytes_moved"], t["hit_rate"]) == (2, 2, 3 * EXPERT_BYTES, 0.25)
    assert t["mean_token_latency_s"] == pytest.approx(3.2 * MS, abs=ABS)
    assert t["tokens_per_s"] == pytest.approx(2 / (6.4 * MS))
    # GPU idle: 0.25 ms host + 1 ms waiting per layer on a load, 0.25 ms host on a hit
    assert t["gpu_idle_share"] == pytest.approx((3 * 1.25 + 0.25) / 6.4)
    b = timeline.bubbles(r.timeline)
    assert b["cause"].tolist() == ["on_demand_transfer"] * 2 + ["host", "on_demand_transfer"]


def test_everything_resident_by_hand_and_lower_bound():
    r = replay(TWO_STEPS, "on_demand_lru", hand_profile(), budget_share=1.0)
    assert r.summary["latency"].to_numpy() / MS == pytest.approx([1.7, 1.7], abs=1e-9)
    assert r.totals["bytes_moved"] == 0 and r.totals["hit_rate"] == 1.0
    # nothing to move: the GPU-only bound is the GPU work, 2 x (0.1 attention + 0.5 expert); with the CPU
    # allowed to take experts, only the attention must stay on the GPU: 2 x 0.1
    assert r.summary["lower_bound_gpu_only"].to_numpy() / MS == pytest.approx([1.2, 1.2], abs=1e-9)
    assert r.summary["lower_bound"].to_numpy() / MS == pytest.approx([0.2, 0.2], abs=1e-9)
    assert set(timeline.bubbles(r.timeline)["cause"]) == {"host"}


def test_lower_bound_counts_the_misses_of_an_optimal_cache():
    # 1 slot per layer: (1, 1) -> (1, 2) must be moved once in step 1 whatever the cache does
    r = replay(TWO_STEPS, "on_demand_lru", hand_profile(), budget_slots=2)
    assert r.summary["lower_bound_gpu_only"].to_numpy() / MS == pytest.approx([1.2, 1.2], abs=1e-9)
    assert (r.summary["lower_bound"] <= r.summary["lower_bound_gpu_only"] + 1e-12).all()
    assert (r.summary["lower_bound"] <= r.summary["latency"]).all()
    # 1, 2 fill the cache; 3 evicts 1 (used last), which then misses again: 2 misses, the optimum
    assert simulator.belady_misses([[1, 2], [1, 3], [2, 1]], 2).tolist() == [0, 1, 1]
    assert simulator.belady_misses([[1, 2, 3, 4], [4, 3, 2, 1]], 4).tolist() == [0, 0]
    # with bypass, 3 (never used again) stays out of the cache and 1 hits
    assert simulator.belady_misses([[1, 2], [1, 3], [2, 1]], 2, bypass=True).tolist() == [0, 1, 0]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_no_policy_beats_the_any_placement_bound(policy):
    tr = load_llamacpp_trace(DATA / "routing" / "qwen3-30b-a3b.route.csv")
    r = replay(tr, policy, "h200", budget_share=0.25, max_steps=24)
    assert (r.summary["lower_bound"] <= r.summary["latency"] * (1 + 1e-9)).all()


@pytest.mark.parametrize("async_io", [False, True])
def test_prefetch_queued_ahead_of_an_on_demand_load(async_io):
    """Layer 0 prefetches a wrong expert (1, 3); layer 1 then needs (1, 1). FIFO: the on-demand load waits
    for the whole prefetch. AsyncIO (0.1 ms chunks): it overtakes the prefetch after the chunk in flight, and
    the prefetch, which layer 1's routing leaves out, is cut there (its last chunk never moves)."""
    tr = make_trace([[[[0], [1]]]], E=4)
    r = replay(tr, GivenPrefetch({0: [(1, 3)]}), hand_profile(), budget_slots=4, async_io=async_io,
               chunk_bytes=EXPERT_BYTES // 10)
    pcie = [x for x in rows_of(r, 0) if x[0] == "pcie"]
    if not async_io:
        assert pcie == [("pcie", 0, 0, "on_demand", 0.35, 1.35), ("pcie", 1, 3, "prefetch", 1.35, 2.35),
                        ("pcie", 1, 1, "on_demand", 2.35, 3.35)]
        assert r.summary["latency"].iloc[0] == pytest.approx(3.85 * MS, abs=ABS)
    else:  # the chunk [2.15, 2.25] in flight when layer 1 plans at 2.2 finishes first
        assert pcie == [("pcie", 0, 0, "on_demand", 0.35, 1.35), ("pcie", 1, 3, "prefetch", 1.35, 2.25),
                        ("pcie", 1, 1, "on_demand", 2.25, 3.25)]
        assert r.summary["latency"].iloc[0] == pytest.approx(3.75 * MS, abs=ABS)
        cut = r.timeline[r.timeline["kind"] == "prefetch"]
        assert cut["bytes"].sum() == EXPERT_BYTES * 9 // 10 and cut["load"].nunique() == 1
        assert r.summary["loads_prefetched"].iloc[0] == 1  # cut part-way, it stays a (wasted) load
    assert timeline.prefetch_precision(r.timeline)["used"].iloc[0] == 0


def test_async_io_promotes_a_prefetch_the_running_layer_waits_for():
    tr = make_trace([[[[0], [1]]]], E=4)
    policy = GivenPrefetch({0: [(1, 3), (1, 1)]})
    fifo = replay(tr, policy, hand_profile(), budget_slots=4)
    aio = replay(tr, policy, hand_profile(), budget_slots=4, async_io=True, chunk_bytes=EXPERT_BYTES // 10)
    assert fifo.summary["latency"].iloc[0] == pytest.approx(3.85 * MS, abs=ABS)  # (1, 1) lands at 3.35
    assert aio.summary["latency"].iloc[0] == pytest.approx(3.75 * MS, abs=ABS)  # it overtook (1, 3) at 2.25
    for r in (fifo, aio):
        assert r.summary["hits"].iloc[0] == 1  # in flight when layer 1 planned: no on-demand load
        assert timeline.prefetch_precision(r.timeline)["used"].iloc[0] == 1
        assert r.summary["prefetches_used"].sum() == 1
        assert timeline.bubbles(r.timeline)["cause"].iloc[-1] == "late_prefetch"


def test_a_slot_still_loading_a_prefetch_is_waited_for_then_given_up():
    """One slot for two layers: layer 0's prefetch of (1, 3) takes the slot as soon as expert (0, 0) is done;
    layer 1 needs (1, 1), finds the slot loading, waits for it to land, then evicts it."""
    tr = make_trace([[[[0], [1]]]], E=4)
    r = replay(tr, GivenPrefetch({0: [(1, 3)]}), hand_profile(), budget_slots=1)
    pcie = [x for x in rows_of(r, 0) if x[0] == "pcie"]
    assert pcie == [("pcie", 0, 0, "on_demand", 0.35, 1.35), ("pcie", 1, 3, "prefetch", 1.85, 2.85),
                    ("pcie", 1, 1, "on_demand", 2.85, 3.85)]


def test_cpu_misses_puts_misses_on_the_cpu_lane():
    cpu_s = 0.3 * MS  # cheaper than loading (1 ms) and computing (0.5 ms): misses stay on the CPU
    tr = make_trace([[[[0, 1], [2, 3]], [[0, 3], [2, 1]]]], E=4)
    r = replay(tr, "cpu_misses", hand_profile(cpu_s=cpu_s), budget_slots=2)
    tl = r.timeline
    cpu = tl[tl["kind"] == "cpu_expert"]
    assert set(cpu["lane"]) == {"cpu"}
    assert sorted(zip(cpu["step"], cpu["layer"], cpu["expert"], strict=True)) == [(0, 0, 1), (0, 1, 3), (1, 0, 3), (1, 1, 1)]
    expected = cpu_expert_time(1, 8, 8, 4, hand_profile(cpu_s=cpu_s))
    assert (cpu["end"] - cpu["start"]).to_numpy() == pytest.approx([expected] * 4)
    assert r.summary["loads_on_demand"].tolist() == [2, 0]  # each layer's one slot, then hits and CPU
    first = rows_of(r, 0)
    assert ("cpu", 0, 1, "cpu_expert", 0.35, 0.65) in first
    # layer 0 ends with its GPU expert at 1.85 (the CPU expert ended at 0.65, overlapped)
    assert ("gpu", 1, -1, "attention", 1.85, 1.95) in first


def test_cpu_expert_ending_last_is_blamed_for_the_bubble():
    """Two prompts batched: every expert gets 2 tokens. Expert 0 of each layer takes the layer's one slot;
    expert 1 runs on the CPU (1.2 ms < 1 ms load + 0.5 ms GPU) and, once expert 0 hits, ends the layer."""
    prompt = [[[0, 1], [0, 1]]] * 2
    tr = make_trace([prompt, prompt], E=2)
    r = replay(tr, "cpu_misses", hand_profile(cpu_s=1.2 * MS), budget_slots=2, batch_size=2)
    assert r.summary["tokens"].tolist() == [2, 2]
    assert r.timeline[r.timeline["kind"] == "cpu_expert"]["tokens"].tolist() == [2] * 4
    assert timeline.bubbles(r.timeline)["cause"].iloc[-1] == "cpu_expert"


def test_host_work_rows_for_policies_that_predict_and_plan():
    tr = make_trace([[[[0], [1]]]], E=4)
    r = replay(tr, MixedPolicy(), hand_profile(predict_s=0.05 * MS, plan_s=0.02 * MS), budget_slots=4)
    kinds = [x[3] for x in rows_of(r, 0) if x[0] == "cpu" and x[1] == 0]
    assert kinds == ["host", "predict", "plan"]
    assert r.summary["host"].iloc[0] == pytest.approx(2 * 0.32 * MS)


def test_on_demand_lru_is_never_faster_than_resident_and_equal_at_full_budget():
    rng = np.random.default_rng(0)
    L, E, K = 3, 6, 2
    routes = [[[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(6)] for _ in range(3)]
    tr = make_trace(routes, E)
    resident = replay(tr, "on_demand_lru", hand_profile(), budget_share=1.0, batch_size=2)
    for slots in (K, L * K, L * E // 2):
        lru = replay(tr, "on_demand_lru", hand_profile(), budget_slots=slots, batch_size=2)
        assert (lru.summary["latency"].to_numpy() >= resident.summary["latency"].to_numpy() - ABS).all()
        assert lru.totals["seconds"] > resident.totals["seconds"]
    full = replay(tr, "on_demand_lru", hand_profile(), budget_slots=L * E, batch_size=2)
    assert full.summary["latency"].to_numpy() == pytest.approx(resident.summary["latency"].to_numpy(), abs=ABS)


def test_budget_below_one_layers_top_k_is_a_clear_error():
    tr = make_trace([[[[0, 1], [2, 3]]]], E=4)
    with pytest.raises(BudgetError, match=r"at least 2 slots \(2000000 bytes"):
        replay(tr, "on_demand_lru", hand_profile(), budget_slots=1)
    with pytest.raises(BudgetError, match="minimum"):
        replay(tr, "on_demand_lru", hand_profile(), budget_share=0.1)
    with pytest.raises(BudgetError, match="not both"):
        replay(tr, "on_demand_lru", hand_profile(), budget_slots=4, budget_share=0.5)
    with pytest.raises(SimulationError, match="batch_size"):
        replay(tr, "on_demand_lru", hand_profile(), budget_slots=4, batch_size=0)
    with pytest.raises(SimulationError, match="route like the trace"):
        replay(tr, "on_demand_lru", hand_profile(), budget_slots=4, layout=make_layout(3, 4, 2))


def test_batches_align_decode_steps_of_their_prompts():
    tr = make_trace([[[[0]]] * 3, [[[1]]] * 2, [[[2]]] * 4], E=4)
    calls = replay_steps(tr, batch_size=2)
    assert [(b, s, len(idx)) for b, s, _, idx in calls] == [(0, 1, 2), (0, 2, 2), (0, 3, 1),
                                                           (1, 1, 1), (1, 2, 1), (1, 3, 1), (1, 4, 1)]
    r = replay(tr, "on_demand_lru", hand_profile(), budget_slots=2, batch_size=2, max_steps=3)
    assert r.summary["tokens"].tolist() == [2, 2, 1] and r.totals["tokens"] == 5


# ---- invariants over random traces -------------------------------------------------------------------

@st.composite
def cases(draw):
    L, E = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    K = draw(st.integers(1, min(E, 3)))
    prompts, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    routes = [[[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(tokens)] for _ in range(prompts)]
    return dict(trace=make_trace(routes, E), slots=draw(st.integers(K, L * E)),
                policy=draw(st.sampled_from(["on_demand_lru", "cpu_misses", "mixed"])),
                batch=draw(st.integers(1, 3)), async_io=draw(st.booleans()),
                chunk=draw(st.sampled_from([EXPERT_BYTES // 4, EXPERT_BYTES, 4 * EXPERT_BYTES])))


def assert_invariants(r, tr: Trace, slots: int, batch: int) -> None:
    tl, eps = r.timeline, 1e-12
    # slots never exceed the budget, and a slot never takes two transfers at once
    loads = tl[tl["lane"] == "pcie"].groupby("load").agg(slot=("slot", "first"), layer=("layer", "first"),
                                                          expert=("expert", "first"), start=("start", "min"),
                                                          end=("end", "max"))
    assert loads["slot"].between(0, slots - 1).all() and r.config["budget_slots"] == slots
    gpu = tl[tl["kind"] == "gpu_expert"]
    assert gpu["slot"].between(0, slots - 1).all()
    for slot, group in loads.sort_values("start").groupby("slot"):
        assert (group["start"].to_numpy()[1:] >= group["end"].to_numpy()[:-1] - eps).all()
        computes = gpu[gpu["slot"] == slot]
        for load in group.itertuples():
            # no load into a slot starts before the previous occupant's computation ended
            before = computes[computes["start"] < load.start - eps]
            assert (before["end"] <= load.start + eps).all()
    # every GPU expert computes what the slot's latest transfer brought, after that transfer ended
    for row in gpu.itertuples():
        prior = loads[(loads["slot"] == row.slot) & (loads["start"] <= row.start + eps)]
        if prior.empty:
            assert slots == tr.layout.num_moe_layers * tr.layout.num_experts  # preloaded: the budget holds all
            continue
        last = prior.loc[prior["start"].idxmax()]
        assert (last["layer"], last["expert"]) == (row.layer, row.expert)
        assert last["end"] <= row.start + eps
    # every routed expert is computed exactly once per layer-step, on the GPU or the CPU
    done = tl[tl["kind"].isin(["gpu_expert", "cpu_expert"])]
    assert not done.duplicated(["step", "layer", "expert"]).any()
    routed = set()
    for step, (_, _, _, index) in enumerate(replay_steps(tr, batch)):
        for layer in range(tr.layout.num_moe_layers):
            routed |= {(step, layer, int(e)) for e in np.unique(tr.experts[index, layer])}
    assert set(zip(done["step"], done["layer"], done["expert"], strict=True)) == routed
    # one GPU stream, one link, one CPU lane: operations on a lane never overlap
    for lane in ("gpu", "pcie", "cpu"):
        ops = tl[tl["lane"] == lane].sort_values("start")
        assert (ops["start"].to_numpy()[1:] >= ops["end"].to_numpy()[:-1] - eps).all(), lane
    s = r.summary
    assert (s["latency"] > 0).all()
    assert s["start"].to_numpy()[1:] == pytest.approx(s["end"].to_numpy()[:-1], abs=eps)
    assert ((s["hits"] + s["misses"]).tolist()
            == [sum(1 for x in routed if x[0] == step) for step in s["step"]])
    assert timeline.prefetch_precision(tl)["used"].iloc[0] == s["prefetches_used"].sum()


@settings(max_examples=50, deadline=None)
@given(cases())
def test_invariants_on_random_traces(case):
    policy = MixedPolicy() if case["policy"] == "mixed" else case["policy"]
    r = replay(case["trace"], policy, hand_profile(), budget_slots=case["slots"], batch_size=case["batch"],
               async_io=case["async_io"], chunk_bytes=case["chunk"])
    assert_invariants(r, case["trace"], case["slots"], case["batch"])


# ---- real data, the real-computation mode, the command line, speed -----------------------------------

def test_replay_of_a_real_llamacpp_trace(shipped_data):
    from prescope.routing.llamacpp import load_llamacpp_trace

    tr = load_llamacpp_trace(shipped_data / "routing" / "qwen3-30b-a3b.route.csv")
    r = replay(tr, "on_demand_lru", "h200", budget_share=0.05, max_steps=8)
    assert r.totals["steps"] == 8 and 0.0 < r.totals["hit_rate"] < 1.0
    loads = r.timeline[r.timeline["lane"] == "pcie"]
    assert len(loads) == r.totals["loads_on_demand"] and len(set(tr.layout.expert_bytes_per_layer)) == 2
    # each load moves one expert of its own layer's size (24 of the 48 layers hold larger experts)
    assert r.totals["bytes_moved"] == sum(tr.layout.bytes_of(layer) for layer in loads["layer"])
    # a 3 MB expert on the H200: milliseconds per token, not seconds (no H: attention at the launch floor)
    assert 1e-3 < r.totals["mean_token_latency_s"] < 0.5


def test_simulate_generate_records_real_routing_and_passes_hidden_states():
    model = tiny_model("olmoe")
    model.generation_config.eos_token_id = None

    class Recording(Policy):
        name = "recording"

        def __init__(self):
            self.seen = []

        def plan(self, view, cache):
            self.seen.append((tuple(view.hidden.shape), len(view.future)))
            return Orders(gpu=list(view.experts))

    policy = Recording()
    r = simulator.simulate_generate(model, None, [[5, 17, 33], [12, 80, 4]], policy, hand_profile(),
                                    max_new_tokens=4, batch_size=2, budget_share=0.5)
    L = r.trace.layout.num_moe_layers
    assert r.totals["steps"] == 3 and r.totals["tokens"] == 6  # 3 fed-back tokens per prompt, 2 prompts a step
    assert len(r.trace.meta["generated"]) == 2
    assert policy.seen[:L] == [((2, model.config.hidden_size), L - 1 - layer) for layer in range(L)]


def test_cli_simulate_prints_a_table_and_a_json_line(tmp_path, capsys):
    path = save_trace(make_trace([[[[0], [1]], [[0], [2]]]], E=4), tmp_path / "t.trace.parquet")
    out_tl = tmp_path / "timeline.csv"
    code = cli.main(["simulate", "--trace", str(path), "--policy", "on_demand_lru", "--profile", "h200",
                     "--budget-share", "0.25", "--batch-size", "1", "--timeline", str(out_tl)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["config"]["policy"] == "on_demand_lru" and record["config"]["budget_slots"] == 2
    assert record["totals"]["steps"] == 2
    # a totals table for people (no row per step unless --per-step), tokens/s in it, then the JSON line
    assert lines[0].startswith("simulated: on_demand_lru on h200") and len(lines) == 11
    tokens_per_s = next(line for line in lines if line.strip().startswith("tokens per second"))
    assert float(tokens_per_s.split()[-1]) == pytest.approx(record["totals"]["tokens_per_s"], rel=1e-2)
    assert len(pd.read_csv(out_tl)) > 0
    assert cli.main(["simulate", "--trace", str(path), "--budget-slots", "0"]) == 2
    assert cli.main(["simulate", "--trace", str(path), "--per-step"]) == 0
    assert "latency_ms" in capsys.readouterr().out.splitlines()[0]


def test_cli_simulate_times_a_trace_with_a_twins_expert_sizes(tmp_path, capsys):
    """--twin: prescope-tiny-like routing (16 layers, 64 experts, top-8) on OLMoE-1B-7B's 12 MiB experts."""
    rng = np.random.default_rng(0)
    steps = [[[list(rng.choice(64, 8, replace=False)) for _ in range(16)] for _ in range(3)]]
    path = save_trace(make_trace(steps, E=64), tmp_path / "t.trace.parquet")
    assert cli.main(["simulate", "--trace", str(path), "--twin", "olmoe-1b-7b"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["config"]["model_class"] == "OlmoeForCausalLM" and record["config"]["twin"] == "olmoe-1b-7b"
    assert record["config"]["expert_bytes"] == 3 * 2048 * 1024 * 2  # bf16 OLMoE expert: 3·H·I·2 bytes
    assert cli.main(["simulate", "--trace", str(path), "--twin", "mixtral-8x7b"]) == 2  # 32 x 8: routes otherwise
    assert "does not route like the trace" in capsys.readouterr().err


def test_replay_speed_at_prescope_tiny_topology():
    """64 decode tokens of a 16-layer, 64-expert, top-8 model (prescope-tiny's topology) with routing that
    reuses about 40% of the previous token's experts, replayed on the H200 profile at 25% budget."""
    L, E, K, T = 16, 64, 8, 64
    rng = np.random.default_rng(0)
    routes, prev = [], rng.permuted(np.tile(np.arange(E), (L, 1)), axis=1)[:, :K]
    for _ in range(T):
        cur = np.empty((L, K), dtype=np.int64)
        for layer in range(L):
            keep = prev[layer][rng.random(K) < 0.4]
            cur[layer] = np.r_[keep, rng.permutation(np.setdiff1d(np.arange(E), keep))[:K - len(keep)]]
        routes.append(cur)
        prev = cur
    tr = make_trace([routes], E, expert_bytes=3 * 2048 * 1024 * 2)
    profile = load_profile("h200")
    timings = {}
    for async_io in (False, True):
        began = time.perf_counter()
        r = replay(tr, "on_demand_lru", profile, budget_share=0.25, async_io=async_io)
        timings[async_io] = time.perf_counter() - began
        assert r.totals["steps"] == T
    print(f"replay of {T} tokens, L={L} E={E} K={K}: FIFO {timings[False]:.3f} s, async {timings[True]:.3f} s")
    assert max(timings.values()) < 2.0, f"replay took {timings}; profile it (policy.victim and the cache's scans?)"


def test_issuing_a_transfer_costs_host_time_before_the_kernel_that_needs_it():
    import dataclasses

    base = replay(TWO_STEPS, "on_demand_lru", hand_profile(), budget_slots=2)
    costly = dataclasses.replace(hand_profile(), host_per_transfer_s=0.5 * MS)
    r = replay(TWO_STEPS, "on_demand_lru", costly, budget_slots=2)
    # every load starts 0.5 ms later and its expert with it: steps load 2 and 1 experts
    assert r.summary["latency"].to_numpy() / MS == pytest.approx(base.summary["latency"].to_numpy() / MS + [1.0, 0.5])
    assert rows_of(r, 0)[2] == ("pcie", 0, 0, "on_demand", 0.85, 1.85)


@pytest.mark.parametrize("steps", [-1, 0, 1.5, True])
def test_max_steps_below_one_or_not_a_count_is_refused(steps):
    tr = make_trace([[[[0], [1]], [[0], [2]]]], E=4)
    with pytest.raises(SimulationError, match=rf"max_steps must be a number of forward calls >= 1 .* got {steps!r}"):
        replay(tr, "on_demand_lru", "h200", budget_share=0.5, max_steps=steps)


def test_cli_simulate_checks_steps_and_the_timeline_path_before_replaying(tmp_path, capsys):
    path = save_trace(make_trace([[[[0], [1]], [[0], [2]]]], E=4), tmp_path / "t.trace.parquet")
    (tmp_path / "FILE").write_text("x")
    for extra, message in [(["--max-steps", "-1"], "--max-steps -1: give a number of forward calls >= 1"),
                           (["--max-steps", "0"], "--max-steps 0: give a number of forward calls >= 1"),
                           (["--timeline", str(tmp_path / "FILE" / "t.csv")], "FILE is a file"),
                           (["--timeline", str(tmp_path / "t.txt")], "must end in one of")]:
        assert cli.main(["simulate", "--trace", str(path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert cli.main(["simulate", "--trace", str(path), "--timeline", str(tmp_path / "tl.parquet")]) == 0
    assert files.verify(tmp_path / "tl.parquet")  # the timeline carries its checksum


# ---- one grouped kernel per wave (the profile's gpu_grouped) -----------------------------------------------

def grouped_hand_profile(device_driven_host_s: float | None = 0.05 * MS) -> HardwareProfile:
    """hand_profile with one grouped kernel per wave: 0.3 ms per wave, 0.1 ms per expert (bytes and FLOPs
    negligible), and 0.05 ms of host time per layer where every expert is resident."""
    import dataclasses

    from prescope.hardware.profiles import GroupedKernelModel

    grouped = GroupedKernelModel(0.3 * MS, 0.1 * MS, NEGLIGIBLE_RATE, NEGLIGIBLE_RATE)
    return dataclasses.replace(hand_profile(), gpu_grouped=grouped,
                               host_device_driven_per_layer_s=device_driven_host_s)


PAIRS = make_trace([[[[0, 1], [2, 3]]]], E=4)  # one step; two experts in each of two layers


def test_a_grouped_wave_runs_its_experts_together_and_a_resident_step_takes_the_device_driven_host_time():
    old = replay(PAIRS, "on_demand_lru", hand_profile(), budget_share=1.0)
    # per layer: attention 0.1 + host 0.25 + two experts of 0.5 one after another
    assert old.summary["latency"].iloc[0] / MS == pytest.approx(2 * (0.1 + 0.25 + 1.0))
    new = replay(PAIRS, "on_demand_lru", grouped_hand_profile(), budget_share=1.0)
    # per layer: attention 0.1 + device-driven host 0.05 + one wave of 0.3 + 2 x 0.1
    assert new.summary["latency"].iloc[0] / MS == pytest.approx(2 * (0.1 + 0.05 + 0.5))
    gpu = new.timeline[new.timeline["kind"] == "gpu_expert"]
    assert gpu.groupby("layer")[["start", "end"]].nunique().eq(1).all().all()  # one kernel per layer
    assert new.summary["lower_bound_gpu_only"].iloc[0] / MS == pytest.approx(2 * (0.1 + 0.5))
    fallback = replay(PAIRS, "on_demand_lru", grouped_hand_profile(None), budget_share=1.0)
    assert fallback.summary["latency"].iloc[0] / MS == pytest.approx(2 * (0.1 + 0.25 + 0.5))


def test_a_grouped_wave_starts_when_the_last_of_its_loads_has_landed():
    r = replay(PAIRS, "on_demand_lru", grouped_hand_profile(), budget_slots=4)  # offloaded: the host's full time
    rows = r.timeline[r.timeline["layer"] == 0]
    loads = rows[rows["lane"] == "pcie"].sort_values("start")
    assert loads["start"].tolist() == pytest.approx([0.35 * MS, 1.35 * MS])  # after attention and host, FIFO
    gpu = rows[rows["kind"] == "gpu_expert"]
    assert gpu["start"].tolist() == pytest.approx([2.35 * MS] * 2)
    assert gpu["end"].tolist() == pytest.approx([2.85 * MS] * 2)


class PlansAhead(Policy):
    """Test policy: every routed expert on the GPU, its planning charged once the layer's work is issued
    (`plan_ahead`, as prescope's late_prefetch does), or before it (`planned_work`) with `late=False`."""

    name = "plans_ahead_test"
    host_work = ("plan",)

    def __init__(self, late: bool = True):
        self.late = late

    def plan(self, view, cache):
        return Orders(gpu=list(view.experts))

    def planned_work(self):
        return () if self.late else self.host_work

    def planned_ahead_work(self):
        return self.host_work if self.late else ()


@pytest.mark.parametrize("plan_ms, late, step_ms", [
    (0.0, True, 1.7),  # resident: per layer 0.1 attention + 0.25 host + 0.5 GPU expert
    (0.2, True, 1.7),  # planning ahead shorter than the layer's GPU work: no step time added
    (0.8, True, 1.7 + 2 * 0.3),  # longer: the host ends 0.3 ms after the GPU, per layer
    (0.2, False, 1.7 + 2 * 0.2),  # planned before the launch: all of it delays the layer
])
def test_planning_ahead_is_charged_after_the_layers_gpu_work_and_overlaps_it(plan_ms, late, step_ms):
    r = replay(TWO_STEPS, PlansAhead(late), hand_profile(plan_s=plan_ms * MS), budget_share=1.0)
    assert r.summary["latency"].to_numpy() / MS == pytest.approx([step_ms, step_ms], abs=1e-9)
    if plan_ms:
        rows = rows_of(r, 0)  # planning starts after the host's work either way; late, beside the expert
        assert ("cpu", 0, -1, "plan", 0.35, 0.35 + plan_ms) in rows
        expert = next(x for x in rows if x[1] == 0 and x[3] == "gpu_expert")
        assert expert[4] == pytest.approx(0.35 if late else 0.35 + plan_ms)
