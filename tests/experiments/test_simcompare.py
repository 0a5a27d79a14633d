"""simcompare: every policy on several profiles, ratios against the right rows, rows marked simulated."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from prescope.experiments import simcompare
from prescope.experiments.bench import ALL_POLICIES
from prescope.experiments.benchrows import RESIDENT
from prescope.experiments.simcompare import CompareConfig, CompareError, add_ratios, compare
from prescope.hardware.profiles import load_profile
from prescope.predict.predictors import GateLookahead

PROFILES = ("v100-pcie3", "h200")
BUDGET = 0.5  # of 3 layers × 8 experts: 12 slots, above the minimum of one layer's top-3


@pytest.fixture(scope="module")
def table(batched_trace, trace_model, one_thread):
    return compare(batched_trace, PROFILES, budgets=(BUDGET,), batch_sizes=(1, 3),
                   gate=GateLookahead.from_model(trace_model))


def test_every_policy_on_every_profile_and_batch(table):
    for profile in ("v100-pcie3", "h200"):
        for batch in (1, 3):
            cell = table[(table["profile"] == profile) & (table["batch"] == batch)]
            assert sorted(cell["policy"]) == sorted((RESIDENT, *ALL_POLICIES))
            assert cell.loc[cell["policy"] == RESIDENT, "budget"].tolist() == [1.0]
            assert set(cell.loc[cell["policy"] != RESIDENT, "budget"]) == {BUDGET}
    assert (table["source"] == "simulated").all()
    assert (table["tok_s"] > 0).all() and (table["lower_bound_ms"] > 0).all()
    assert (table["over_bound"] >= 1.0 - 1e-9).all()  # no policy beats the simulator's lower bound


def test_async_io_and_predictors_mirror_the_bench(table):
    rows = table.drop_duplicates("policy").set_index("policy")
    # the OLMoE twin's 12 MiB experts load in well under 1 ms on every profile: prescope leaves AsyncIO off
    assert not rows.loc["prescope", "async_io"] and rows.loc["belady", "async_io"]
    assert not rows.loc["ceiling", "async_io"]  # prescope's own choice, with the same costs
    assert not rows.loc[["on_demand_lru", "cpu_misses", "hybrid", "lookahead_prefetch", "activation_matrix",
                         RESIDENT], "async_io"].any()
    assert rows.loc["lookahead_prefetch", "predictor"] == "gate_lookahead"
    assert rows.loc["prescope", "predictor"] == "gate_lookahead"  # no LLaPor given
    assert rows.loc["belady", "predictor"] == rows.loc["ceiling", "predictor"] == "replayed future"


def test_ratios_use_the_same_profile_batch_and_budget(table):
    for row in table.itertuples():
        same = table[(table["profile"] == row.profile) & (table["batch"] == row.batch)]
        resident = same.loc[same["policy"] == RESIDENT, "tok_s"].item()
        assert row.vs_resident == pytest.approx(row.tok_s / resident)
        if row.policy == RESIDENT:
            assert math.isnan(row.vs_on_demand_lru) and math.isnan(row.vs_belady) and math.isnan(row.vs_ceiling)
            continue
        for peer in ("on_demand_lru", "belady", "ceiling"):
            ref = same.loc[(same["policy"] == peer) & (same["budget"] == row.budget), "tok_s"].item()
            assert getattr(row, f"vs_{peer}") == pytest.approx(row.tok_s / ref)
    assert table.loc[table["policy"] == "ceiling", "vs_ceiling"].eq(1.0).all()


def test_add_ratios_picks_rows_by_profile_batch_and_budget():
    rows = []
    for p, profile in enumerate(("a", "b")):
        for batch in (1, 4):
            rows.append({"profile": profile, "policy": RESIDENT, "budget": 1.0, "batch": batch,
                         "tok_s": 100.0 * (p + 1) * batch, "decode_ms": 10.0, "bytes_per_step": 0.0})
            for budget in (0.25, 0.5):
                for policy, speed in (("on_demand_lru", 10.0), ("belady", 40.0), ("prescope", 20.0)):
                    rows.append({"profile": profile, "policy": policy, "budget": budget, "batch": batch,
                                 "tok_s": speed * (p + 1) * batch * (1 + budget), "decode_ms": 20.0,
                                 "bytes_per_step": 1e9 * budget})
    out = add_ratios(pd.DataFrame(rows), {"a": 100.0, "b": 10.0}).set_index(["profile", "policy", "budget", "batch"])
    for profile in ("a", "b"):
        for batch in (1, 4):
            for budget in (0.25, 0.5):
                r = out.loc[(profile, "prescope", budget, batch)]
                assert r["vs_on_demand_lru"] == pytest.approx(2.0)
                assert r["vs_belady"] == pytest.approx(0.5) and math.isnan(r["vs_ceiling"])  # no ceiling ran
                assert r["vs_resident"] == pytest.approx(0.2 * (1 + budget))
    # link ms per step = bytes / peak: 2.5 and 5 ms on profile a (resident step 10 ms), 25 and 50 on b
    offloaded = out.reset_index().query("policy != @RESIDENT")
    assert offloaded.groupby("profile")["regime"].unique().map(list).to_dict() == {"a": ["host-bound"],
                                                                                   "b": ["link-bound"]}


def test_bad_profile_name_is_a_clear_error(batched_trace):
    with pytest.raises(CompareError, match=r"profile 'k80-pcie2'.*v100-pcie3"):
        compare(batched_trace, ["k80-pcie2"], budgets=(BUDGET,), batch_sizes=(1,))
    with pytest.raises(CompareError, match="k80-pcie2"):
        CompareConfig(profiles=("h200", "k80-pcie2"))


def test_bad_grid_is_a_clear_error(batched_trace):
    with pytest.raises(CompareError, match="unknown or no policies.*'lru'"):
        compare(batched_trace, ["h200"], policies=("lru",))
    with pytest.raises(CompareError, match=r"budgets.*\(0, 1\)"):
        compare(batched_trace, ["h200"], budgets=(1.0,))
    with pytest.raises(CompareError, match="multiple of the largest batch size 16"):
        CompareConfig(profiles=("h200",), prompts=10)
    with pytest.raises(CompareError, match="measured bench JSON 'nowhere.json' does not exist"):
        CompareConfig(profiles=("h200",), measured="nowhere.json")


def test_prompt_subset_is_evenly_spaced(batched_trace):
    assert simcompare.prompt_subset(batched_trace, 0) is batched_trace
    two = simcompare.prompt_subset(batched_trace, 2)
    assert sorted(two.tokens["prompt"].unique()) == [0, 2]
    assert len(two) == int(batched_trace.tokens["prompt"].isin([0, 2]).sum())


def test_prescope_gets_llapor_with_a_capped_lookahead():
    fake = SimpleNamespace(config=SimpleNamespace(distance=2))
    policy, name = simcompare.policy_for("prescope", gate=None, llapor=fake, lookahead=3)
    assert (name, policy.lookahead, policy.async_io) == ("llapor", 2, True)
    assert simcompare.policy_for("hybrid")[1] == "previous step"


def test_command_writes_marked_results(batched_trace, tmp_path, capsys, one_thread):
    from prescope.cli import main
    from prescope.routing.trace import save_trace

    path = save_trace(batched_trace, tmp_path / "t.trace.parquet")
    out = tmp_path / "simulated"
    code = main(["simulate-compare", "--trace", str(path), "--twin", "", "--profiles", "v100-pcie3",
                 "--policies", "on_demand_lru", "prescope", "ceiling", "--budgets", str(BUDGET), "--batch-sizes", "1",
                 "--prompts", "2", "--predictor", "", "--routers", "fit", "--measured", "", "--host-of", "", "--out", str(out)])
    assert code == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["command"] == "simulate-compare" and final["source"] == "simulated"
    assert [r["profile"] for r in final["prescope"]] == ["v100-pcie3"]
    csv = pd.read_csv(out / "comparison.csv")
    assert (csv["source"] == "simulated").all() and len(csv) == 4
    meta = json.loads((out / "comparison.json").read_text())
    assert meta["trace"]["prompts"] == 2 and meta["profiles"][0]["source"] == "published"
    readme = (out / "README.md").read_text()
    assert "SIMULATED" in readme and "ESTIMATE" in readme and "v100-pcie3" in readme
    assert np.isfinite(csv.loc[csv["policy"] == "prescope", "vs_on_demand_lru"]).all()


def test_measured_context_matches_profile_twin_policy_budget_and_batch():
    from prescope.experiments.simcompare import measured_context

    table = pd.DataFrame([{"profile": p, "policy": "prescope", "budget": 0.25, "batch": b, "decode_ms": ms,
                           "tok_s": 1e3 * b / ms} for p, b, ms in (("h200", 1, 30.0), ("h200", 4, 60.0),
                                                                     ("v100-pcie3", 1, 99.0))])
    bench = {"config": {"profile": "h200"}, "cells": [
        {"model": "olmoe-1b-7b@prescope-tiny", "policy": "prescope", "budget": 0.25, "batch": 1,
         "decode_ms_median": 40.0, "decode_tok_s": 25.0},
        {"model": "mixtral-8x7b", "policy": "prescope", "budget": 0.25, "batch": 4,
         "decode_ms_median": 10.0, "decode_tok_s": 400.0}]}
    both = measured_context(table, bench, "olmoe-1b-7b")
    assert len(both) == 1 and both.loc[0, "profile"] == "h200" and both.loc[0, "batch"] == 1
    assert both.loc[0, "error"] == pytest.approx(30.0 / 40.0 - 1)


def test_host_variants_keep_link_and_gpu_and_take_the_host_side():
    host = dataclasses.replace(load_profile("h200"), name="slow-host", host_overhead_per_layer_s=3e-3,
                               host_per_transfer_s=2e-4)
    base = load_profile("v100-pcie3")
    variant = simcompare.with_host(base, host)
    assert variant.name == "v100-pcie3+slow-host-host" and variant.source == "published"
    assert variant.pinned_h2d == base.pinned_h2d and variant.gpu_expert == base.gpu_expert
    assert (variant.host_overhead_per_layer_s, variant.host_per_transfer_s) == (3e-3, 2e-4)
    assert [p.name for p, _ in simcompare.profile_set(["v100-pcie3", "h200"])] == ["v100-pcie3", "h200"]
    chosen = simcompare.profile_set(["v100-pcie3", "h200"], host_of="h200")  # variants of published ones
    assert [p.name for p, _ in chosen] == ["v100-pcie3", "h200", "v100-pcie3+h200-host"]


def test_the_command_line_builds_outside_the_repository(tmp_path, monkeypatch, capsys):
    """The defaults name files of the repository: building the parser must not open them, and running with
    them elsewhere is one line naming the missing file."""
    from prescope import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["simulate-compare", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "h200-engine.json" in err and len(err.splitlines()) == 1


def test_a_llamacpp_trace_compares_like_simulate_reads_it(tmp_path, capsys, one_thread):
    """The reader `simulate` uses: a llama.cpp CSV (no hidden states) runs with the history predictors, per-layer
    expert sizes and a one-line experts-only warning; a twin of another shape or too large a batch is refused."""
    from conftest import write_route_csv

    from prescope.cli import main

    csv = write_route_csv(tmp_path / "t.route.csv", [300_000, 600_000, 300_000], tokens=8)
    common = ["--profiles", "v100-pcie3", "--policies", "on_demand_lru", "prescope", "--budgets", "0.25",
              "--prompts", "0", "--predictor", "", "--measured", "", "--host-of", "", "--out", str(tmp_path / "o")]
    assert main(["simulate-compare", "--trace", str(csv), "--twin", "", "--batch-sizes", "1", *common]) == 0
    out, err = capsys.readouterr()
    assert "not a readable parquet" not in err and err.count("warning") == 1 and "experts only" in err
    meta = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert meta["hidden_states"] is False and meta["priced_on"] == "experts only"
    assert meta["layout"]["layer_expert_bytes"] == [300_000, 600_000, 300_000]
    csv_rows = pd.read_csv(tmp_path / "o" / "comparison.csv")
    assert set(csv_rows["predictor"]) >= {"previous step"}
    for extra, message in ((["--twin", "olmoe-1b-7b", "--batch-sizes", "1"], "does not route like"),
                           (["--twin", "", "--batch-sizes", "4"], "holds 1 prompt")):
        assert main(["simulate-compare", "--trace", str(csv), *extra, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
