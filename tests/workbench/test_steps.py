"""prescope.workbench.steps: traces found or recorded, policies by name (with the bench's predictors), comparisons
simulated and measured."""

from __future__ import annotations

import numpy as np
import pytest

from prescope import timeline as tl
from prescope.files import PROJECT_DIR
from prescope.hardware.profiles import load_profile
from prescope.routing.trace import save_trace
from prescope.workbench import steps
from prescope.workbench.steps import WorkbenchError


@pytest.fixture(scope="module")
def tiny():
    from prescope.models.tiny import load_tiny

    return load_tiny()


@pytest.fixture(scope="module")
def trace(tiny):
    model, tokenizer = tiny
    return steps.tiny_trace("", num_prompts=2, max_new_tokens=6, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def hidden(tiny):
    """prescope-tiny's routing with the router inputs (hidden states) a gate lookahead reads."""
    model, tokenizer = tiny
    return steps.tiny_trace("", num_prompts=2, max_new_tokens=8, keep_hidden=True, model=model, tokenizer=tokenizer)


def test_tiny_trace_records_when_no_file_and_loads_when_there_is(trace, tmp_path):
    assert trace.meta["source"] == "record_trace" and steps.trace_label(trace) == "recorded now"
    assert trace.tokens["prompt"].nunique() == 2 and trace.layout.num_moe_layers == 16
    path = save_trace(trace, tmp_path / "t.parquet")
    again = steps.tiny_trace(path)
    np.testing.assert_array_equal(again.experts, trace.experts)
    assert steps.trace_label(again) == str(path)
    with pytest.raises(WorkbenchError, match="num_prompts must be in 1..8"):
        steps.tiny_trace("", num_prompts=9)


def test_policies_by_name_with_a_lookahead_where_they_have_one():
    assert steps.takes_lookahead("prescope") and not steps.takes_lookahead("on_demand_lru")
    assert steps.named_policy("prescope", lookahead=3).lookahead == 3
    assert steps.named_policy("on_demand_lru", lookahead=3).name == "on_demand_lru"
    with pytest.raises(WorkbenchError, match="unknown policy 'lru'"):
        steps.named_policy("lru")


def test_what_if_profile_rescales_the_link_and_says_so():
    h200 = load_profile("h200")
    assert steps.what_if_profile("h200") == h200
    assert steps.what_if_profile("h200", h200.pinned_h2d.peak_gbps) == h200
    slow = steps.what_if_profile("h200", 8.0)
    assert slow.name == "h200 @ 8 GB/s" and slow.pinned_h2d.peak_gbps == pytest.approx(8.0)


def test_compare_policies_rows_bounds_and_results(trace):
    table, results = steps.compare_policies(trace, ["on_demand_lru", "belady"], "v100-pcie3",
                                                batch_sizes=[1, 2], max_steps=4)
    assert table[["policy", "batch_size"]].values.tolist() == [["on_demand_lru", 1], ["on_demand_lru", 2],
                                                               ["belady", 1], ["belady", 2]]
    assert table.attrs == {"source": "simulated", "profile": "v100-pcie3"}
    assert (table["bound_latency_ms"] <= table["latency_ms"] + 1e-9).all()
    assert (table["bound_tokens_per_s"] >= table["tokens_per_s"] - 1e-9).all()
    assert set(results) == {(p, b) for p in ("on_demand_lru", "belady") for b in (1, 2)}
    assert results["belady", 1].config["async_io"] is True  # the policy's own AsyncIO choice
    with pytest.raises(WorkbenchError, match="batch_size 4 needs at least 4 prompts; the trace has 2"):
        steps.compare_policies(trace, ["on_demand_lru"], "h200", batch_sizes=[4])


def test_bubble_table_one_row_per_policy_and_cause(trace):
    _, results = steps.compare_policies(trace, ["on_demand_lru", "prescope"], "v100-pcie3", max_steps=3)
    timelines = {p: results[p, 1].timeline for p in ("on_demand_lru", "prescope")}
    table = steps.bubble_table(timelines)
    assert len(table) == 2 * len(tl.CAUSES) and table.attrs == {"source": "simulated", "profile": "v100-pcie3"}
    lru = results["on_demand_lru", 1]
    per_step = tl.bubbles(lru.timeline)["duration"].sum() / len(lru.summary)
    assert table[table["policy"] == "on_demand_lru"]["seconds"].sum() == pytest.approx(per_step)
    _, other = steps.compare_policies(trace, ["on_demand_lru"], "h200", max_steps=3)
    with pytest.raises(WorkbenchError, match="different sources or profiles"):
        steps.bubble_table({"a": timelines["prescope"], "b": other["on_demand_lru", 1].timeline})


def test_link_sweep_a_faster_link_is_never_slower_on_demand(trace):
    sweep = steps.link_sweep(trace, ["on_demand_lru"], "v100-pcie3", [4.0, 16.0, 64.0], max_steps=4)
    assert sweep["link_gbps"].tolist() == [4.0, 16.0, 64.0]
    assert sweep["latency_ms"].is_monotonic_decreasing
    assert sweep.attrs["profile"] == "v100-pcie3 (link rescaled)"


def test_measure_policies_runs_the_engine_and_reproduces_the_stock_tokens(tiny):
    model, tokenizer = tiny
    table, timelines = steps.measure_policies(model, tokenizer, ["on_demand_lru"], device="cpu",
                                                  budget_share=0.25, max_new_tokens=3)
    row = table.iloc[0]
    assert bool(row["same_tokens"]) and row["steps"] == 2 and row["loads_on_demand"] > 0
    assert table.attrs == {"source": "measured", "profile": tl.measured_profile(tl.host_device("cpu"))}
    assert timelines["on_demand_lru"].attrs["source"] == "measured"


def test_resolve_mode():
    import torch

    expected = ("measure", "cuda") if torch.cuda.is_available() else ("simulate", "cpu")
    assert steps.resolve_mode("auto", "auto") == expected
    assert steps.resolve_mode("simulate", "cpu") == ("simulate", "cpu")
    assert steps.resolve_mode("measure", "cpu") == ("measure", "cpu")
    with pytest.raises(WorkbenchError, match="mode must be"):
        steps.resolve_mode("guess", "cpu")


def test_real_traces(shipped_data, tmp_path):
    traces = steps.real_traces(shipped_data)
    assert set(traces) == set(steps.REAL_TRACES)
    assert traces["qwen3-30b-a3b"].layout.num_moe_layers == 48
    with pytest.raises(FileNotFoundError, match="not found in"):
        steps.real_traces(tmp_path)


def test_a_twin_times_the_routing_with_its_sizes_and_keeps_the_hidden_states(hidden):
    twin = steps.on_twin(hidden, "olmoe-1b-7b")
    assert twin.hidden is not None and twin.layout == hidden.layout  # a predictor still reads prescope-tiny's
    layout, dense = steps.timing_layout(twin)
    assert layout.expert_bytes == 3 * 2048 * 1024 * 2 and dense > 0  # OLMoE-1B-7B's bf16 experts
    assert steps.timing_layout(hidden) == (hidden.layout, None)
    assert "timed with olmoe-1b-7b's expert sizes" in steps.trace_label(twin)
    small = steps.simulate(hidden, "on_demand_lru", "h200", budget_share=0.25, max_steps=3)
    large = steps.simulate(twin, "on_demand_lru", "h200", budget_share=0.25, max_steps=3)
    assert large.config["expert_bytes"] == layout.expert_bytes and large.config["dense_params"] == dense
    assert large.totals["bytes_moved"] > 100 * small.totals["bytes_moved"]
    with pytest.raises(WorkbenchError, match="mixtral-8x7b routes 32 layers × 8 experts"):
        steps.on_twin(hidden, "mixtral-8x7b")


def test_the_gate_lookahead_predicts_experts_the_previous_step_did_not_use(hidden):
    """At batch 1 with 16 slots a layer, the previous step's 8 experts are all still resident: predicting them
    prefetches nothing. The gate lookahead reads the router input and predicts experts that are absent."""
    twin = steps.on_twin(hidden, "olmoe-1b-7b")
    table, _ = steps.compare_policies(twin, ["on_demand_lru", "lookahead_prefetch"], "h200", max_steps=6,
                                      predictor="previous_step")
    gated, _ = steps.compare_policies(twin, ["on_demand_lru", "lookahead_prefetch"], "h200", max_steps=6,
                                      predictor="gate_lookahead")
    history, gate = table.set_index("policy"), gated.set_index("policy")
    assert history.loc["lookahead_prefetch", "loads_prefetched"] == 0
    assert gate.loc["lookahead_prefetch", "loads_prefetched"] > 0
    assert gate.loc["lookahead_prefetch", "loads_on_demand"] < gate.loc["on_demand_lru", "loads_on_demand"]
    assert gate.loc["on_demand_lru", "vs_on_demand_lru"] == 1.0
    with pytest.raises(WorkbenchError, match="reads the router inputs, and this trace has none"):
        steps.gate_lookahead("gate_lookahead", steps.on_twin(steps.tiny_trace("", num_prompts=1, max_new_tokens=2),
                                                             "olmoe-1b-7b"))
    with pytest.raises(WorkbenchError, match="predictor must be one of"):
        steps.gate_lookahead("llapor", twin)


def test_rows_say_how_far_the_bound_is_the_host_time_and_what_the_gate_did(hidden):
    twin = steps.on_twin(hidden, "olmoe-1b-7b")
    table, results = steps.compare_policies(twin, ["on_demand_lru", "prescope"], "h200", max_steps=4)
    rows = table.set_index("policy")
    result = results["prescope", 1]
    assert rows.loc["prescope", "host_ms"] == pytest.approx(result.summary["host"].mean() * 1e3)
    assert rows.loc["prescope", "host_ms"] > rows.loc["prescope", "bound_latency_ms"]  # why the bound is far
    np.testing.assert_allclose(table["of_bound"], table["tokens_per_s"] / table["bound_tokens_per_s"])
    assert 0.0 <= rows.loc["prescope", "gate_on_demand_share"] <= 1.0
    assert np.isnan(rows.loc["on_demand_lru", "gate_on_demand_share"])  # LRU has no gate
    # prescope-tiny's own 48 KB experts on the engine's H200 profile: a miss adds ~10 µs to its layer, less than
    # planning's 0.5 ms: every layer on demand, nothing prefetched
    alone = steps.simulate(hidden, "prescope", PROJECT_DIR / "reports/h200/h200-engine.json", budget_share=0.25,
                           max_steps=4)
    assert alone.totals["gate_on_demand_share"] == 1.0 and alone.totals["loads_prefetched"] == 0
    assert "host_s_per_step" in alone.totals
