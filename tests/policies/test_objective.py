"""J of a plan computed from the plan alone: by hand on a small window, the link's order, and illegal plans refused
with a clear error."""

from __future__ import annotations

import pytest

from prescope.policies.objective import expected_window_latency, link_schedule
from prescope.policies.presched import Candidate, Held, Instance, Plan, PlanError, plan


def flat(t: float):
    return lambda n: t


def window() -> Instance:
    """Layer 0 routes expert 1 (resident) and 2 (absent); layer 1 may use expert 3 (p = 0.8). τ = 1, GPU 0.5,
    CPU 2.0 per expert, gap 0.3, one free slot and one evictable key (2, 5) needed with chance 0.5."""
    return Instance(0, (1, 2), (1.0, 1.0), ((Candidate(3, 0.8),),), 1.0, flat(0.5), flat(2.0),
                    resident=frozenset({(0, 1)}), free_slots=1, evictable=(Held((2, 5), 0.5),), gap=0.3)


def test_objective_by_hand():
    """Load 2 on demand, prefetch (1, 3) into (2, 5)'s slot. The GPU runs 1 at [0, 0.5] and 2 once it lands, at
    [1.0, 1.5]: F0 = 1.5, also the fastest split (2 on the CPU ends at 2.0), so layer 1 starts at S_1 = 1.8. A
    stall is min(τ, 2.0 − 0.5) = 1: the candidate's weight w = 0.8, all of it expected stall (base). The
    prefetch starts after the load, at 1.0, so r = (1.8 − 1.0) / 1 = 0.8 of it lands in time: it saves 0.8 · 0.8.
    The victim costs 0.5 · 1. J = 1.5 + 0.8 − 0.64 + 0.5 = 2.16; with the free slot for the load instead of the
    prefetch's, the same."""
    inst = window()
    chosen = Plan((1, 2), (), (2,), ((1, 3),), (None, (2, 5)), 0.0)
    assert expected_window_latency(inst, chosen) == pytest.approx(2.16)
    assert expected_window_latency(inst, Plan((1, 2), (), (2,), ((1, 3),), ((2, 5), None), 0.0)) == pytest.approx(2.16)
    no_prefetch = Plan((1, 2), (), (2,), (), (None,), 0.0)
    assert expected_window_latency(inst, no_prefetch) == pytest.approx(1.5 + 0.8)
    on_cpu = Plan((1,), (2,), (), (), (), 0.0)  # F0 = max(0.5, 2.0)
    assert expected_window_latency(inst, on_cpu) == pytest.approx(2.0 + 0.8)
    best = plan(inst)  # the planner's own objective is J of its plan, and no plan above beats it
    assert best.objective == pytest.approx(expected_window_latency(inst, best))
    assert best.objective <= 2.16 + 1e-9


def test_link_schedule_puts_on_demand_loads_first():
    inst = window()
    rows = link_schedule(inst, Plan((1, 2), (), (2,), ((1, 3),), (None, (2, 5)), 0.0))
    assert rows == [((0, 2), "on_demand", 0.0, 1.0), ((1, 3), "prefetch", 1.0, 2.0)]


def test_illegal_plans_are_clear_errors():
    inst = Instance(0, (1,), (1.0,), (), 1.0, flat(0.1), flat(1.0), free_slots=2)
    with pytest.raises(PlanError, match="every routed expert once"):
        expected_window_latency(inst, Plan((), (), (), (), (), 0.0))
    with pytest.raises(PlanError, match="absent experts on the GPU"):
        expected_window_latency(inst, Plan((1,), (), (), (), (), 0.0))
    with pytest.raises(PlanError, match="victims must be distinct evictable"):
        expected_window_latency(inst, Plan((1,), (), (1,), (), ((4, 4),), 0.0))
    with pytest.raises(PlanError, match="outside the window"):
        expected_window_latency(inst, Plan((1,), (), (1,), ((3, 2),), (None, None), 0.0))
