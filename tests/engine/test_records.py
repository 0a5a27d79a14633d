"""The engine's records of the policy's time: its own host work and its wait for the device, per step."""

from __future__ import annotations

import pytest

from prescope.engine.records import Records
from prescope.policies.base import Orders
from prescope.policies.protocol import LayerRun


def run(plan_s: float, victim_s: float, wait_s: float = 0.0) -> LayerRun:
    return LayerRun(Orders(), plan_s=plan_s, victim_s=victim_s, forecast_wait_s=wait_s)


def records(layers: int = 2) -> Records:
    return Records(streams=None, num_layers=layers, timing="off", stats=None, about={})


def test_planned_splits_the_policys_time_into_host_work_and_the_wait_for_the_device():
    r = records()
    r.begin_step(tokens=1, phase="decode")
    r.own_seconds[r.step] = 0.010  # the layers' host time so far
    r.planned(0, run(0.004, 0.001, 0.003))
    r.planned(1, run(0.002, 0.0))  # a layer that did not wait
    assert r.wait_by_step[0] == pytest.approx(0.003) and r.forecast_wait_seconds == [0.003, 0.0]
    assert r.plan_by_step[0] == pytest.approx(0.004 + 0.001 - 0.003 + 0.002)
    assert r.plan_by_step[0] + r.wait_by_step[0] == pytest.approx(sum(r.plan_seconds) + sum(r.victim_seconds))
    assert r.own_seconds[0] == pytest.approx(0.010 - 0.003)  # the wait is not the engine's own host work
    r.begin_step(tokens=1, phase="decode")
    r.planned(0, run(0.001, 0.0, 0.005))  # more wait than time spent: clipped to it
    assert r.wait_by_step[1] == pytest.approx(0.001) and r.plan_by_step[1] == 0.0
    r.planned(1, run(0.001, 0.0, -1e-18))  # rounding below zero: none
    assert r.wait_by_step[1] == pytest.approx(0.001) and min(r.plan_by_step.values()) >= 0.0


def test_clear_forgets_the_waits():
    r = records()
    r.begin_step(tokens=1, phase="decode")
    r.planned(0, run(0.002, 0.0, 0.001))
    r.clear()
    assert r.wait_by_step == {} and r.forecast_wait_seconds == [0.0, 0.0] and r.plan_by_step == {}


def test_planning_ahead_counts_as_the_policys_host_work():
    """`Policy.plan_ahead`'s time (LayerRun.ahead_s) is in the policy's columns like `plan`'s: its wall time in
    plan_seconds, its host work in plan_by_step, a wait inside it in the wait."""
    r = records()
    r.begin_step(tokens=1, phase="decode")
    r.planned(0, LayerRun(Orders(), plan_s=0.001, victim_s=0.0005, forecast_wait_s=0.0002, ahead_s=0.003))
    assert r.plan_seconds == [pytest.approx(0.004), 0.0]
    assert r.plan_by_step[0] == pytest.approx(0.001 + 0.0005 + 0.003 - 0.0002)
    assert r.wait_by_step[0] == pytest.approx(0.0002)
