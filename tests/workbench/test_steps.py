"""prescope.workbench.steps: traces found or recorded, policies by name, comparisons simulated and measured, the
committed H200 tables read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prescope import timeline as tl
from prescope.hardware.profiles import load_profile
from prescope.routing.trace import save_trace
from prescope.workbench import steps
from prescope.workbench.steps import WorkbenchError

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "reports" / "h200"


@pytest.fixture(scope="module")
def tiny():
    from prescope.models.tiny import load_tiny

    return load_tiny()


@pytest.fixture(scope="module")
def trace(tiny):
    model, tokenizer = tiny
    return steps.tiny_trace("", num_prompts=2, max_new_tokens=6, model=model, tokenizer=tokenizer)


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
    table, results = steps.compare_policies(trace, ["on_demand_lru", "oracle"], "v100-pcie3",
                                                batch_sizes=[1, 2], max_steps=4)
    assert table[["policy", "batch_size"]].values.tolist() == [["on_demand_lru", 1], ["on_demand_lru", 2],
                                                               ["oracle", 1], ["oracle", 2]]
    assert table.attrs == {"source": "simulated", "profile": "v100-pcie3"}
    assert (table["bound_latency_ms"] <= table["latency_ms"] + 1e-9).all()
    assert (table["bound_tokens_per_s"] >= table["tokens_per_s"] - 1e-9).all()
    assert set(results) == {(p, b) for p in ("on_demand_lru", "oracle") for b in (1, 2)}
    assert results["oracle", 1].config["async_io"] is True  # the policy's own AsyncIO choice
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


def test_h200_tables_and_fidelity_scaling():
    bench, fidelity = steps.h200_tables(H200)
    assert bench.attrs["source"] == "measured" and bench.attrs["profile"] == "host:NVIDIA H200"
    assert {"mixtral-8x7b", "olmoe-1b-7b"} <= set(bench["model"])
    assert fidelity.attrs["measured_on"] == "host:NVIDIA H200" and fidelity.attrs["profile"]
    scaling = steps.fidelity_scaling(fidelity, "mixtral-8x7b")
    cells = int((fidelity["model"] == "mixtral-8x7b").sum())
    assert len(scaling) == 2 * cells and set(scaling["source"]) == {"measured", "simulated"}
    np.testing.assert_allclose(scaling["tokens_per_s"], scaling["batch_size"] * 1e3 / scaling["latency_ms"])
    with pytest.raises(WorkbenchError, match="no fidelity cells for 'gpt-2'"):
        steps.fidelity_scaling(fidelity, "gpt-2")
    with pytest.raises(FileNotFoundError, match="no bench"):
        steps.h200_tables(ROOT / "notebooks")


def test_real_traces(shipped_data, tmp_path):
    traces = steps.real_traces(shipped_data)
    assert set(traces) == set(steps.REAL_TRACES)
    assert traces["qwen3-30b-a3b"].layout.num_moe_layers == 48
    with pytest.raises(FileNotFoundError, match="not found in"):
        steps.real_traces(tmp_path)


def test_measured_scaling_takes_one_run_per_model():
    bench, _ = steps.h200_tables(H200)
    table = steps.measured_scaling(bench, "olmoe-1b-7b")
    assert table.attrs["run"] == "bench-olmoe" and table.attrs["source"] == "measured"
    assert not table.duplicated(["cell", "batch_size"]).any()
    assert {"stock@1", "resident@1", "on_demand_lru@0.25"} <= set(table["cell"])
    with pytest.raises(WorkbenchError, match="no bench cells for 'gpt-2'"):
        steps.measured_scaling(bench, "gpt-2")


def test_comparison_table_ratios_within_each_run_and_the_winner_of_each_cell():
    folder = ROOT / "reports" / "h200" / "comparison"
    table = steps.comparison_table(folder, ["mixtral4-3d15d9b", "qwen3-8-3d15d9b"])
    assert table.attrs == {"source": "measured", "profile": "host:NVIDIA H200"}
    assert set(table["run"]) == {"mixtral4-3d15d9b", "qwen3-8-3d15d9b"} and set(table["git_revision"]) == {"3d15d9b"}
    lru = table[table["policy"] == "on_demand_lru"]
    assert np.allclose(lru["vs_on_demand_lru"], 1.0)
    best = steps.best_per_cell(table).set_index(["model", "batch"])
    for (model, batch), row in best.iterrows():  # the winner is the fastest contender of its own cell
        cell = table[(table["model"] == model) & (table["batch"] == batch) & ~table["policy"].isin(steps.REFERENCES)]
        assert row["best"] == cell.loc[cell["decode_tok_s"].idxmax(), "policy"]
        assert row["prescope_vs_best"] <= 1.0
    assert best.loc[("mixtral-8x7b", 4), "best"] == "prescope"
    # a run with ablations: prescope[lookahead=1] is faster at batch 4 but is an option of prescope, no contender
    ablated = steps.comparison_table(folder, ["mixtral4-5f83609"])
    assert {"prescope+cal", "prescope[lookahead=1]"} <= set(ablated["policy"])
    assert list(steps.best_per_cell(ablated)["best"]) == ["oracle", "prescope"]
    with pytest.raises(FileNotFoundError, match="no bench run 'nope'.*runs there: .*mixtral4-3d15d9b"):
        steps.comparison_table(folder, ["nope"])
