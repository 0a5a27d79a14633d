"""prescope.workbench.results: the committed H200 tables read back (one run per model, the stock rows' experts
implementation), the comparison runs, and a measured timeline beside the simulator's replay of the same cell."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prescope import timeline as tl
from prescope.workbench import results
from prescope.workbench.steps import WorkbenchError

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "reports" / "h200"
COMPARISON = H200 / "comparison"
ENGINE_PROFILE = H200 / "h200-engine.json"
CELL = dict(model="mixtral-8x7b", policy="prescope", budget=0.25, batch=4)


def test_h200_tables_and_fidelity_scaling():
    bench, fidelity = results.h200_tables(H200)
    assert bench.attrs["source"] == "measured" and bench.attrs["profile"] == "host:NVIDIA H200"
    assert {"mixtral-8x7b", "olmoe-1b-7b"} <= set(bench["model"])
    assert fidelity.attrs["measured_on"] == "host:NVIDIA H200" and fidelity.attrs["profile"]
    scaling = results.fidelity_scaling(fidelity, "mixtral-8x7b")
    cells = int((fidelity["model"] == "mixtral-8x7b").sum())
    assert len(scaling) == 2 * cells and set(scaling["source"]) == {"measured", "simulated"}
    np.testing.assert_allclose(scaling["tokens_per_s"], scaling["batch_size"] * 1e3 / scaling["latency_ms"])
    with pytest.raises(WorkbenchError, match="no fidelity cells for 'gpt-2'"):
        results.fidelity_scaling(fidelity, "gpt-2")
    with pytest.raises(FileNotFoundError, match="no bench"):
        results.h200_tables(ROOT / "notebooks")


def test_each_model_comes_from_one_run_and_the_rows_left_out_are_named():
    """bench-mixtral.json was cut after Mixtral, and holds OLMoE's stock rows of another day: OLMoE is shown from
    bench-olmoe.json only, so its stock rows appear once."""
    bench, _ = results.h200_tables(H200)
    assert not bench.duplicated(["model", "policy", "budget", "batch"]).any()
    assert set(bench.loc[bench["model"] == "olmoe-1b-7b", "run"]) == {"bench-olmoe"}
    assert any(line.startswith("bench-mixtral: ") and "olmoe-1b-7b" in line for line in bench.attrs["left_out"])
    stock = bench[bench["policy"] == "stock"]
    assert set(stock["experts"]) == {"grouped_mm (default)"}  # what bench ran, not recorded in these files
    assert set(bench.loc[bench["policy"] != "stock", "experts"]) == {""}


def test_measured_scaling_takes_one_run_per_model():
    bench, _ = results.h200_tables(H200)
    table = results.measured_scaling(bench, "olmoe-1b-7b")
    assert table.attrs["run"] == "bench-olmoe" and table.attrs["source"] == "measured"
    assert not table.duplicated(["cell", "batch_size"]).any()
    assert {"stock@1", "resident@1", "on_demand_lru@0.25"} <= set(table["cell"])
    with pytest.raises(WorkbenchError, match="no bench cells for 'gpt-2'"):
        results.measured_scaling(bench, "gpt-2")


def test_comparison_table_ratios_within_each_run_and_the_winner_of_each_cell():
    table = results.comparison_table(COMPARISON, ["mixtral4-3d15d9b", "qwen3-8-3d15d9b"])
    assert table.attrs == {"source": "measured", "profile": "host:NVIDIA H200"}
    assert set(table["run"]) == {"mixtral4-3d15d9b", "qwen3-8-3d15d9b"} and set(table["git_revision"]) == {"3d15d9b"}
    lru = table[table["policy"] == "on_demand_lru"]
    assert np.allclose(lru["vs_on_demand_lru"], 1.0)
    best = results.best_per_cell(table).set_index(["model", "batch"])
    for (model, batch), row in best.iterrows():  # the winner is the fastest contender of its own cell
        cell = table[(table["model"] == model) & (table["batch"] == batch) & ~table["policy"].isin(results.REFERENCES)]
        assert row["best"] == cell.loc[cell["decode_tok_s"].idxmax(), "policy"]
        assert row["prescope_vs_best"] <= 1.0
    assert best.loc[("mixtral-8x7b", 4), "best"] == "prescope"
    # a run with ablations: prescope[lookahead=1] is faster at batch 4 but is an option of prescope, no contender
    ablated = results.comparison_table(COMPARISON, ["mixtral4-5f83609"])
    assert {"prescope+cal", "prescope[lookahead=1]"} <= set(ablated["policy"])
    assert list(results.best_per_cell(ablated)["best"]) == ["belady", "prescope"]  # the run named it `oracle`
    with pytest.raises(FileNotFoundError, match="no bench run 'nope'.*runs there: .*mixtral4-3d15d9b"):
        results.comparison_table(COMPARISON, ["nope"])


def test_the_measured_timeline_of_a_cell_is_the_engines_on_the_h200():
    measured = results.measured_timeline(COMPARISON, "mixtral4", **CELL)
    assert measured.attrs["source"] == "measured" and measured.attrs["profile"] == "host:NVIDIA H200"
    assert measured.attrs["meta"]["git_revision"].startswith("461845e") and measured.attrs["meta"]["batch"] == 4
    assert set(measured["phase"]) == {"prefill", "decode"} and measured["step"].min() == 0
    kinds = set(measured["kind"])
    assert {"prefetch", "on_demand", "gpu_expert", "cpu_expert"} <= kinds  # PCIe against GPU and CPU compute
    loads = measured[measured["lane"] == "pcie"]
    gbps = loads["bytes"] / (loads["end"] - loads["start"]) / 1e9
    assert 40 < float(gbps.median()) < 60  # Mixtral's 336 MB experts crossed PCIe 5 at its measured peak
    with pytest.raises(WorkbenchError, match="has no cell mixtral-8x7b prescope@0.75 b4; its cells: "):
        results.measured_timeline(COMPARISON, "mixtral4", **{**CELL, "budget": 0.75})
    with pytest.raises(FileNotFoundError, match="no timed run 'mixtral4-5f83609'.*runs there: .*mixtral4"):
        results.measured_timeline(COMPARISON, "mixtral4-5f83609", **CELL)


def test_the_simulated_cell_replays_the_routing_the_cell_replayed_on_the_profile():
    sim = results.simulated_cell(COMPARISON, "mixtral4", ENGINE_PROFILE, **CELL, max_steps=3)
    assert sim.timeline.attrs["source"] == "simulated" and sim.timeline.attrs["profile"] == "h200-engine"
    assert sim.config["expert_bytes"] == 3 * 4096 * 14336 * 2 and sim.config["num_moe_layers"] == 4
    assert sim.config["batch_size"] == 4 and sim.config["async_io"] is True and len(sim.summary) == 3
    routed = sim.timeline[sim.timeline["kind"].isin(["gpu_expert", "cpu_expert"])]
    with np.load(COMPARISON / "mixtral4.routing.npz") as npz:
        route = npz["mixtral-8x7b__prescope__0.25__4"]  # [steps, L, B, K]
    first = {(layer, int(e)) for layer in range(4) for e in np.unique(route[0, layer])}
    step0 = routed[routed["step"] == 0]
    assert set(zip(step0["layer"], step0["expert"], strict=True)) == first


def test_timeline_pair_numbers_the_steps_alike_and_summarises_them():
    measured, simulated = results.timeline_pair(COMPARISON, "mixtral4", ENGINE_PROFILE, **CELL, decode_steps=2)
    assert sorted(measured["step"].unique()) == sorted(simulated["step"].unique()) == [1, 2]
    assert (measured.attrs["source"], simulated.attrs["source"]) == ("measured", "simulated")
    table = results.pair_summary(measured, simulated)
    assert list(table.index) == [1, 2]
    assert table[("step (ms)", "measured")].tolist() == pytest.approx(
        (tl.step_summary(measured)["latency"] * 1e3).round(3).tolist())
    ratio = table[("step (ms)", "simulated")] / table[("step (ms)", "measured")]
    assert ((ratio > 0.5) & (ratio < 2)).all()  # the same cell, within a factor of two step by step
    with pytest.raises(WorkbenchError, match="decode_steps must be >= 1"):
        results.timeline_pair(COMPARISON, "mixtral4", ENGINE_PROFILE, **CELL, decode_steps=0)


def test_committed_tables_say_where_they_were_measured(tmp_path):
    from prescope.workbench.results import tables_profile

    assert tables_profile(Path(__file__).resolve().parents[2] / "reports" / "llapor") == "host:cpu"
    with pytest.raises(FileNotFoundError, match="not committed measured tables"):
        tables_profile(tmp_path)
