"""The step arbiter: the gate's decisions against planning every layer and planning none, by measured step time."""

from __future__ import annotations

from test_gate import engine_costs, gated
from test_peers import cache_with, view

from prescope.policies.arbiter import DEMAND, GATED, PLANNED, StepArbiter


def run(arbiter: StepArbiter, seconds: dict[str, float], steps: int, shape: int = 4, first: int = 1) -> list[str]:
    """The arms of `steps` steps at `shape`, each measured as seconds[arm]."""
    arms = []
    for step in range(first, first + steps):
        arms.append(arbiter.arm(step, shape))
        assert arbiter.arm(step, shape) == arms[-1]  # one arm for the whole step
        arbiter.step_measured(seconds[arms[-1]])
    return arms


def test_without_measured_steps_every_step_is_gated():
    arbiter = StepArbiter()
    assert [arbiter.arm(step, 4) for step in range(40)] == [GATED] * 40


def test_trials_leave_out_the_settling_steps_and_the_planned_arms_first_then_the_fastest_arm_runs():
    arbiter = StepArbiter()
    arms = run(arbiter, {GATED: 0.24, PLANNED: 0.20, DEMAND: 0.23}, 14)  # within CLEAR of each other
    # 2 settling steps (gated), the planned arm's first (its graphs' capture, not counted), then two counted each
    assert arms[:9] == [GATED, GATED, PLANNED, DEMAND, GATED, PLANNED, DEMAND, GATED, PLANNED]
    assert arms[9:] == [PLANNED] * 5
    summary = arbiter.summary()[4]
    assert summary["best"] == PLANNED and summary["gated_ms"] == [240.0, 240.0]
    assert summary["demand_ms"] == [230.0, 230.0]
    assert summary["planned_ms"] == [200.0] * 4  # the arm that runs keeps measuring (its last WINDOW)
    assert summary["runs"] == {GATED: 4, PLANNED: 8, DEMAND: 2}


def test_a_clear_loser_is_tried_once():
    """An arm whose counted step is CLEAR times slower than another's fastest ends its trials there."""
    arbiter = StepArbiter()
    arms = run(arbiter, {GATED: 0.30, PLANNED: 0.50, DEMAND: 0.20}, 12)
    assert arms[:7] == [GATED, GATED, PLANNED, DEMAND, GATED, PLANNED, DEMAND]
    assert arms[7:] == [DEMAND] * 5 and arbiter.summary()[4]["planned_ms"] == [500.0]


def test_the_gated_arm_wins_where_it_is_faster_and_the_others_are_tried_again_in_turn():
    arbiter = StepArbiter()
    arms = run(arbiter, {GATED: 0.1, PLANNED: 0.4, DEMAND: 0.3}, 7 + 2 * (StepArbiter.REPROBE + 1))
    assert arms[:7] == [GATED, GATED, PLANNED, DEMAND, GATED, PLANNED, GATED]  # the losers tried once
    after = arms[7:]
    assert after[:StepArbiter.REPROBE] == [GATED] * StepArbiter.REPROBE
    probes = [a for a in after if a != GATED]
    assert sorted(probes) == [DEMAND, PLANNED] and after[StepArbiter.REPROBE] != GATED


def test_a_change_in_step_time_is_followed_by_the_probes():
    arbiter = StepArbiter()
    run(arbiter, {GATED: 0.1, PLANNED: 0.4, DEMAND: 0.3}, 7)
    # planning became faster: the probes bring the planned arm's median below the gated one's
    arms = run(arbiter, {GATED: 0.3, PLANNED: 0.05, DEMAND: 0.3}, 6 * (StepArbiter.REPROBE + 1), first=8)
    last = arms[-(StepArbiter.REPROBE + 1):]
    assert last.count(PLANNED) == StepArbiter.REPROBE  # another arm probed once


def test_each_step_shape_learns_apart():
    arbiter = StepArbiter()
    seconds = {GATED: 0.3, PLANNED: 0.2, DEMAND: 0.4}
    run(arbiter, seconds, 12, shape=4)
    assert run(arbiter, seconds, 2, shape=64, first=13) == [GATED, GATED]  # settling again
    assert run(arbiter, seconds, 1, shape=4, first=15) == [PLANNED]  # the first shape kept


def _layers_planned(policy, step: int, L: int = 8) -> int:
    cache = cache_with(16, L, [])
    planned = 0
    for layer in range(L):
        policy.plan(view(layer, [1, 2, 3], L=L, step=step), cache)
        planned += not policy.on_demand
    return planned


def test_a_gate_that_runs_layers_on_demand_plans_every_layer_once_planned_steps_measure_faster():
    """Planning costs more than the model says it saves (P = 5 s), so the gate runs every layer on demand;
    measured, planned steps are faster: after the trials every layer plans. Without `measured_gate`, or with
    the clock saying the gate is right, the layers stay on demand."""
    for measured_gate, planned_faster, want in ((True, True, 8), (False, True, 0), (True, False, 0)):
        policy = gated(engine_costs(plan=5.0), cache_with(16, 8, []), measured_gate=measured_gate)
        for step in range(1, 11):
            planned = _layers_planned(policy, step)
            fast = planned == 8 if planned_faster else planned == 0
            policy.step_measured(0.2 if fast else 0.3)
        assert _layers_planned(policy, 11) == want, (measured_gate, planned_faster)


def test_a_gate_that_plans_runs_every_layer_on_demand_once_such_steps_measure_faster():
    """Planning costs nothing in the model (P = 0), so the gate plans every layer; measured, steps run on demand
    are faster: after the trials no layer plans (where loads are short and planning's host time is not)."""
    policy = gated(engine_costs(plan=0.0), cache_with(16, 8, []))
    assert _layers_planned(policy, 1) == 8
    policy.step_measured(0.3)
    for step in range(2, 12):
        policy.step_measured(0.2 if _layers_planned(policy, step) == 0 else 0.3)
    (shape,) = policy.arbiter.summary().values()  # one step shape: three tokens, one per routed expert
    assert _layers_planned(policy, 12) == 0 and shape["best"] == DEMAND


def test_an_ungated_policy_ignores_step_times():
    policy = gated(engine_costs(plan=5.0), cache_with(16, 8, []), gate=False)
    for step in range(1, 12):
        assert _layers_planned(policy, step) == 8
        policy.step_measured(1.0)
    assert policy.arbiter.shapes == {}


def test_with_the_arbiter_measuring_the_gate_no_longer_probes_single_layers():
    """The planned steps measure P for the gate (`HostMeter`), so a gated step of layers run on demand plans
    none of them; without `measured_gate` the meter plans one every PROBE_EVERY on-demand layers. Measured
    here: 6 s of host time per planned layer, 1 ms per layer run on demand."""
    planned = {}
    for measured_gate in (True, False):
        policy = gated(engine_costs(), cache_with(16, 8, []), measured_gate=measured_gate)
        cache, count = cache_with(16, 8, []), 0
        for step in range(1, 8 + 5):  # settling and trials (planned steps slower), then 5 steps of 8 layers
            for layer in range(8):
                policy.plan(view(layer, [1, 2, 3], L=8, step=step), cache)
                policy.host_measured(0.001 if policy.on_demand else 6.0)
                count += step >= 8 and not policy.on_demand
            policy.step_measured(0.2 if policy.on_demand else 0.3)
        planned[measured_gate] = count
    assert planned == {True: 0, False: 1}
