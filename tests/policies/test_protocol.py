"""The layer protocol's accounting of the policy's time: the wait for the device inside `plan` and `victim`
(`Policy.forecast_wait_s`) is reported apart from the policy's own host work."""

from __future__ import annotations

import time

import pytest

from prescope.policies.base import LayerView, OnDemandLRU
from prescope.policies.cache import ExpertCache
from prescope.policies.protocol import Executor, LayerRun, run_layer


class Recorder(Executor):
    def __init__(self):
        self.loads, self.waves = [], []

    def start_cpu(self, layer, experts):
        raise AssertionError("no CPU experts ordered")

    def load(self, key, slot, speculative):
        self.loads.append(key)
        return True

    def compute(self, layer, wave):
        self.waves.append(wave)


class Waiting(OnDemandLRU):
    """LRU that, in each plan and victim call, spends a measured part of its time 'waiting for the device'."""

    def __init__(self, wait_s: float):
        super().__init__()
        self.wait_s, self.reported = wait_s, 0.0

    def _wait(self):
        began = time.perf_counter()
        time.sleep(self.wait_s)
        waited = time.perf_counter() - began
        self.forecast_wait_s += waited
        self.reported += waited

    def plan(self, view, cache):
        self._wait()
        sum(range(2000))  # host work beside the wait
        return super().plan(view, cache)

    def victim(self, cache, key):
        self._wait()
        return super().victim(cache, key)


def test_the_wait_inside_plan_and_victims_is_counted_apart_and_adds_up_to_the_policys_time():
    policy, cache = Waiting(0.001), ExpertCache(4, 2)
    policy.reset(cache, 8)
    view = LayerView(0, 0, 2, 8, (3, 5), (2, 1))
    run = run_layer(view, policy, cache, executor := Recorder())
    assert executor.loads == [(0, 3), (0, 5)]  # two misses: two victim calls beside the plan
    assert run.forecast_wait_s == pytest.approx(policy.reported, abs=1e-12) and run.forecast_wait_s >= 0.003
    assert 0.0 <= run.forecast_wait_s <= run.plan_s + run.victim_s + run.ahead_s
    assert run.host_s > 0 and run.host_s + run.forecast_wait_s == pytest.approx(run.plan_s + run.victim_s + run.ahead_s)
    # a second layer reports only its own wait, not the policy's running total
    second = run_layer(LayerView(0, 1, 2, 8, (1,), (3,)), policy, cache, Recorder())
    assert second.forecast_wait_s == pytest.approx(policy.reported - run.forecast_wait_s, abs=1e-12)


def test_a_policy_that_never_waits_reports_no_wait():
    policy, cache = OnDemandLRU(), ExpertCache(4, 2)
    policy.reset(cache, 8)
    run = run_layer(LayerView(0, 0, 2, 8, (3, 5), (2, 1)), policy, cache, Recorder())
    assert run.forecast_wait_s == 0.0 and run.host_s == pytest.approx(run.plan_s + run.victim_s + run.ahead_s)
    assert LayerRun(run.orders, plan_s=1e-6, forecast_wait_s=2e-6).host_s == 0.0  # never negative
