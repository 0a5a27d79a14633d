"""PreSched's speed bench: its instances are real decode windows the planner solves exactly, and the timing runs."""

from __future__ import annotations

import json

import pytest

from prescope.experiments.planspeed import bench_instances, planning_time
from prescope.policies.objective import expected_window_latency
from prescope.policies.presched import plan

REL = 1e-9


def test_bench_instances_are_decode_windows_the_planner_solves_exactly():
    """The speed bench's instances (E = 64, K = 8, D = 3, L = 16): the budget's share of every later layer
    resident, 2·K candidates per later layer, prefetches on the link, one victim per routed expert and
    candidate; on them the pruned search finds the full enumeration's optimum."""
    for share in (0.25, 0.5):
        for inst in bench_instances(share, 12, seed=3):
            assert len(inst.experts) == 8 and [len(c) for c in inst.predictions] == [16, 16, 16]
            assert inst.inflight and inst.link_free == pytest.approx(len(inst.inflight) * inst.load)
            assert len(inst.evictable) == 8 + 3 * 16 and inst.free_slots == 0
            window = [key for key in inst.resident if key[0] != inst.layer]
            assert len(window) == 3 * round(share * 64)
            fast, full = plan(inst), plan(inst, prune=False)
            assert fast.objective == pytest.approx(full.objective, rel=REL, abs=REL)
            assert expected_window_latency(inst, fast) == pytest.approx(fast.objective, rel=REL, abs=REL)


def test_planning_time_reports_median_and_p90_per_budget():
    """`planning_time` runs the bench (printed; no bound on this machine's speed is asserted)."""
    out = planning_time((0.25, 0.5), count=5, repeats=1)
    print(json.dumps({"bench": "presched.plan", **{str(k): v for k, v in out.items()}}))
    assert set(out) == {0.25, 0.5}
    assert all(0 < t["median_ms"] <= t["p90_ms"] for t in out.values())


def test_replay_planning_time_times_every_planned_layer_of_a_real_replay():
    """`--replay`'s cells on the shipped Qwen3-30B-A3B trace (two forward calls): one timing per MoE layer
    and call, the simulated latency beside it."""
    from prescope.data import shipped
    from prescope.experiments.planspeed import replay_planning_time
    from prescope.routing.llamacpp import load_llamacpp_trace

    trace = load_llamacpp_trace(shipped("routing", "qwen3-30b-a3b.route.csv"))
    rows = replay_planning_time(trace, batches=(1, 2), steps=2)
    assert [(r["policy"], r["batch"]) for r in rows] == [(p, b) for p in ("prescope[gate=False]", "ceiling[gate=False]")
                                                          for b in (1, 2)]
    for row in rows:
        assert row["layers"] == 2 * trace.layout.num_moe_layers
        assert 0 < row["median_us"] <= row["p90_us"] and row["simulated_ms_per_token"] > 0
        # each layer's time splits into PreSched's and the policy's own, so each median is at most the whole's
        assert 0 < row["own_median_us"] <= row["median_us"] and 0 <= row["presched_median_us"] <= row["median_us"]
        assert row["presched_p90_us"] > 0  # PreSched ran at some layers
        # a layer's host time is its plan's and its victims': no less than the plan's alone, layer by layer
        assert row["host_median_us"] >= row["median_us"] and row["host_p90_us"] >= row["p90_us"]
    from prescope.policies import presched

    assert presched.plan.__module__ == "prescope.policies.presched"  # the timed stand-in was taken back


def test_the_policies_decide_as_before_the_planning_speed_ups():
    """Every decision of prescope and ceiling replaying the shipped Qwen3-30B-A3B trace (4 forward calls, batch
    1, 4 and 16, 25 % and 10 % budgets: pools with room and full ones) has the digest recorded with the
    policies as they were before the planning speed-ups (planspeed_decisions.json says the revision and the
    command). A change meant to alter decisions re-records it with that command."""
    from pathlib import Path

    from prescope.data import shipped
    from prescope.experiments.planspeed import replay_decisions
    from prescope.routing.llamacpp import load_llamacpp_trace

    recorded = json.loads((Path(__file__).parent / "planspeed_decisions.json").read_text())
    trace = load_llamacpp_trace(shipped("routing", "qwen3-30b-a3b.route.csv"))
    rows = replay_decisions(trace, batches=(1, 4, 16), budget_shares=(0.25, 0.1), steps=4)
    assert [{k: r[k] for k in recorded["rows"][0]} for r in rows] == recorded["rows"]
    full = [r for r in rows if r["budget_share"] == 0.1]
    assert all(any(victim for d in r["decisions"] for _, victim in d[5]) for r in full)  # victims were named
    assert all(any(d[4] for d in r["decisions"]) for r in rows)  # and prefetches issued


def test_a_predictor_given_to_the_replays_feeds_prescope_and_decides_as_through_its_history_lists():
    """`predictor` reaches the prescope policy (its forecast is timed, `forecast_us`), not the ceiling; on the
    shipped Qwen3-30B-A3B trace a routing-only LLaPor read from the policy's memory masks (`predict_masks`)
    decides exactly as the same networks read through the history lists (`predict_window`)."""
    from conftest import ByLists, random_routing_llapor

    from prescope.data import shipped
    from prescope.experiments.planspeed import replay_decisions, replay_planning_time
    from prescope.routing.llamacpp import load_llamacpp_trace

    trace = load_llamacpp_trace(shipped("routing", "qwen3-30b-a3b.route.csv"))
    model = random_routing_llapor(trace.layout, distance=3, routing_window=2)
    fast, slow = (replay_decisions(trace, policies=("prescope[gate=False]",), batches=(1, 4), steps=2, predictor=p)
                  for p in (model, ByLists(model)))
    assert [r["digest"] for r in fast] == [r["digest"] for r in slow]
    plain = replay_decisions(trace, policies=("prescope[gate=False]",), batches=(1,), steps=2)
    assert plain[0]["digest"] != fast[0]["digest"]  # the predictor was read
    rows = replay_planning_time(trace, batches=(1,), steps=1, predictor=model)
    assert rows[0]["forecast_us"] > 0 and "forecast_us" not in rows[1]
