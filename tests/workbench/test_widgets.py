"""prescope.workbench.widgets: the dashboard's pure update (replay → timeline figure + summary), the widget redrawing one
FigureWidget in place as controls move, and the update time on a 32-token decode of prescope-tiny."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import plotly.graph_objects as go
import pytest

from prescope.hardware.profiles import load_profile
from prescope.workbench import steps, widgets
from prescope.workbench.widgets import DashboardError, DashboardState

DECODE_TOKENS = 32  # the benchmark's size: a 32-token decode of prescope-tiny
UPDATE_TARGET_S = 0.5  # the workbench's goal for one update on a 2-core machine
UPDATE_BOUND_S = 2.5  # generous: CI machines are shared and noisy
BENCH_REPEATS = 5


@pytest.fixture(scope="module")
def traces():
    """prescope-tiny's routing of two prompts, 32 new tokens each, recorded on the CPU."""
    return {"prescope-tiny": steps.tiny_trace("", num_prompts=2, max_new_tokens=DECODE_TOKENS)}


def test_state_rejects_what_cannot_be_simulated():
    with pytest.raises(DashboardError, match="policy 'lru'"):
        DashboardState(policy="lru")
    with pytest.raises(DashboardError, match=r"budget_share must be in \(0, 1\]"):
        DashboardState(budget_share=0.0)
    with pytest.raises(DashboardError, match="link_gbps must be >= 0"):
        DashboardState(link_gbps=-1.0)
    with pytest.raises(DashboardError, match="batch_size must be >= 1"):
        DashboardState(batch_size=0)
    assert widgets.state_fields()[:3] == ["trace", "policy", "profile"]


def test_update_draws_the_last_steps_and_summarises_the_replay(traces):
    state = DashboardState(policy="on_demand_lru", max_steps=8, show_steps=2)
    figure, summary = widgets.dashboard_update(state, traces)
    assert isinstance(figure, go.Figure)
    assert [a.text for a in figure.layout.annotations] == ["simulated on h200"]
    assert "steps 6–7 of 8" in figure.layout.title.text
    values = summary["value"]
    assert values["policy"] == "on_demand_lru" and values["lookahead"] == "n/a"  # LRU predicts nothing
    assert values["steps replayed"] == 8 and values["batch size"] == 1
    assert values["link GB/s (pinned peak)"] == round(load_profile("h200").pinned_h2d.peak_gbps, 2)
    assert values["lower bound step (ms)"] <= values["decode step (ms)"]
    assert summary.attrs == {"source": "simulated", "profile": "h200"}


def test_link_and_budget_sliders_change_the_replay(traces):
    base = DashboardState(policy="on_demand_lru", max_steps=8)
    _, fast = widgets.dashboard_update(base, traces)
    slow_figure, slow = widgets.dashboard_update(replace(base, link_gbps=4.0), traces)
    assert slow["value"]["profile"] == "h200 @ 4 GB/s"
    assert slow_figure.layout.annotations[0].text == "simulated on h200 @ 4 GB/s"
    assert slow["value"]["decode step (ms)"] > fast["value"]["decode step (ms)"]  # same loads, slower link
    _, everything = widgets.dashboard_update(replace(base, budget_share=1.0), traces)
    assert everything["value"]["on-demand loads"] == 0 and everything["value"]["hit rate"] == 1.0


def test_lookahead_reaches_the_policies_that_predict(traces):
    _, summary = widgets.dashboard_update(DashboardState(policy="prescope", lookahead=3, max_steps=4), traces)
    assert summary["value"]["lookahead"] == 3
    _, belady = widgets.dashboard_update(DashboardState(policy="belady", max_steps=4), traces)
    assert belady["value"]["AsyncIO priority link"] is True  # the link the replay really used


def test_update_names_an_unknown_trace_or_a_batch_too_large(traces):
    with pytest.raises(DashboardError, match=r"trace 'nope': choose one of \['prescope-tiny'\]"):
        widgets.dashboard_update(DashboardState(trace="nope"), traces)
    with pytest.raises(steps.WorkbenchError, match="batch_size 3 needs at least 3 prompts; the trace has 2"):
        widgets.dashboard_update(DashboardState(batch_size=3), traces)


def test_dashboard_redraws_one_figure_widget_in_place(traces):
    dash = widgets.Dashboard(traces, DashboardState(policy="on_demand_lru", max_steps=6))
    figure = dash.figure
    assert isinstance(figure, go.FigureWidget) and len(dash.seconds) == 1
    assert dash.controls["batch_size"].max == 2 and dash.controls["lookahead"].max == 6
    dash.controls["budget_share"].value = 1.0
    assert dash.figure is figure and len(dash.seconds) == 2
    assert "budget 100%" in figure.layout.title.text and "on-demand loads" in dash.table.value
    dash.controls["profile"].value = "v100-pcie3"  # the link slider follows the profile: one update, not two
    assert len(dash.seconds) == 3 and dash.controls["link_gbps"].value == load_profile("v100-pcie3").pinned_h2d.peak_gbps
    assert figure.layout.annotations[0].text == "simulated on v100-pcie3"
    assert {t.name for t in figure.data} >= {"attention", "gpu_expert"}
    dash.controls["policy"].value = "cpu_misses"
    assert dash.controls["lookahead"].disabled and dash.state.policy == "cpu_misses"
    assert "simulated in" in dash.status.value
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert 'class="plotly-graph-div"' in bundle["text/html"] and "on-demand loads" in bundle["text/html"]
    assert "policy = cpu_misses" in bundle["text/html"]  # offline, the cell shows the state it was drawn in


def test_the_dashboard_refuses_what_its_controls_would_clamp(traces):
    with pytest.raises(DashboardError, match=r"batch_size 99: the trace 'prescope-tiny' has 2 prompts, so 1-2"):
        widgets.Dashboard(traces, DashboardState(batch_size=99))
    with pytest.raises(DashboardError, match=r"link_gbps 200: the link slider spans 1-128 GB/s"):
        widgets.Dashboard(traces, DashboardState(link_gbps=200.0))
    with pytest.raises(DashboardError, match=r"lookahead 9: at most 6 layers ahead"):
        widgets.Dashboard(traces, DashboardState(lookahead=9))
    with pytest.raises(DashboardError, match=r"budget_share 0.333: the budget slider moves from 0.01 to 1 in steps"):
        widgets.Dashboard(traces, DashboardState(budget_share=0.333))
    with pytest.raises(DashboardError, match=r"trace 'nope': choose one of"):
        widgets.Dashboard(traces, DashboardState(trace="nope"))


def test_a_control_clamped_by_another_trace_says_so(traces):
    one = {**traces, "one prompt": steps.tiny_trace("", num_prompts=1, max_new_tokens=4)}
    dash = widgets.Dashboard(one, DashboardState(policy="on_demand_lru", batch_size=2, max_steps=3))
    dash.controls["trace"].value = "one prompt"
    assert dash.controls["batch_size"].value == 1 and dash.controls["batch_size"].disabled
    assert "batch size set to 1: the trace has 1 prompts" in dash.status.value
    link = dash.controls["link_gbps"]
    assert link.value == load_profile("h200").pinned_h2d.peak_gbps  # the profile's own link, not a rounded one
    assert dash.summary["value"]["profile"] == "h200"


def test_dashboard_update_benchmark(traces):
    """One update of the default dashboard (prescope's planner, 32 decode steps of prescope-tiny)."""
    state = DashboardState(max_steps=DECODE_TOKENS)
    widgets.dashboard_update(state, traces)  # warm caches and imports
    times = []
    for _ in range(BENCH_REPEATS):
        start = time.perf_counter()
        _, summary = widgets.dashboard_update(state, traces)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"\ndashboard_update, {DECODE_TOKENS}-token decode of prescope-tiny, policy {state.policy}: median "
          f"{median * 1e3:.0f} ms over {BENCH_REPEATS} (target {UPDATE_TARGET_S * 1e3:.0f} ms; "
          f"all {[round(t * 1e3) for t in times]})")
    assert summary["value"]["steps replayed"] == DECODE_TOKENS
    assert median < UPDATE_BOUND_S
