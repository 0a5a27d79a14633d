"""The refit of a profile to the fast engine's bench runs: it recovers a known profile from simulated cells, the
built-in `h200-graphs` is what it gives on the committed H200 runs, and the simulator on that profile prices
every measured resident step within the fidelity tolerance."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prescope.experiments import refit
from prescope.experiments.fidelity import TOLERANCE, fidelity_table, routing_trace, twin_layout
from prescope.hardware.profiles import GroupedKernelModel, load_profile
from prescope.sim.simulator import replay

ENGINE = Path(__file__).resolve().parents[2] / "reports" / "h200" / "engine"
BENCHES = (ENGINE / "bf46dd9" / "bench.json", ENGINE / "b64" / "bench.json")


@pytest.fixture(scope="module")
def benches():
    return [refit.read_bench_run(p) for p in BENCHES]


def close(got, want, where: str = "") -> None:
    """Equal structures, numbers within the rounding of a least-squares fit."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not math.isnan(want):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), where
    else:
        assert got == want, where


def simulated_bench(bench: refit.Bench, truth, keep) -> refit.Bench:
    """`bench` with the cells `keep` selects, each measured as the simulator prices it on `truth` (resident
    cells' host time per layer: truth's device-driven host time)."""
    layouts = {m: twin_layout(m, L) for m, L in (("olmoe-1b-7b", None), ("mixtral-8x7b", 4))}
    cells = []
    for cell in bench.data["cells"]:
        key = refit.cell_key(cell)
        if not keep(cell) or key not in bench.routing:
            continue
        layout, dense = layouts[cell["model"]]
        trace = routing_trace(bench.routing[key], layout, bench.data["config"]["input_len"])
        policy = "on_demand_lru" if cell["policy"] == "resident" else cell["policy"]
        sim = replay(trace, policy, truth, budget_share=cell["budget"], batch_size=cell["batch"], dense_params=dense,
                     policy_profile=bench.data["config"]["profile"])
        cells.append({**cell, "decode_ms_median": 1e3 * float(sim.summary["latency"].median()),
                      "host_ms_per_layer": 1e3 * truth.host_device_driven_per_layer_s
                      if cell["policy"] == "resident" else cell["host_ms_per_layer"]})
    return dataclasses.replace(bench, data={**bench.data, "cells": cells})


def test_the_refit_recovers_a_known_profile_from_simulated_measurements(benches):
    truth = dataclasses.replace(load_profile("h200"), gpu_grouped=GroupedKernelModel(150e-6, 3e-6, 2500.0, 546.0),
                                host_device_driven_per_layer_s=10e-6, host_overhead_per_layer_s=60e-6)

    def keep(cell):
        return cell["model"] in ("olmoe-1b-7b", "mixtral-8x7b") and (
            cell["policy"] == "resident" or (cell["policy"] == "on_demand_lru" and cell["batch"] == 1
                                             and cell["model"] == "olmoe-1b-7b"))

    synthetic = [simulated_bench(benches[0], truth, keep)]
    got = refit.refit_profile(synthetic, "h200", name="synthetic", date="2026-12-02")
    # one decode step sums L layers whose distinct experts vary from step to step: the fit sees their mean, the
    # simulated step is the median over steps, hence within a few per cent rather than exact
    assert got.gpu_grouped.wave_fixed_s == pytest.approx(150e-6, rel=0.02)
    assert got.gpu_grouped.mem_gbps == pytest.approx(2500.0, rel=0.02)
    assert got.gpu_grouped.expert_fixed_s == pytest.approx(3e-6, abs=0.5e-6)
    assert got.host_device_driven_per_layer_s == pytest.approx(10e-6)
    assert got.host_overhead_per_layer_s == pytest.approx(60e-6, rel=0.05)
    assert got.fit["gpu_grouped_rms_log_error"] < 0.03
    assert got.pinned_h2d == truth.pinned_h2d and got.cpu_expert == truth.cpu_expert  # kept from the base


def test_the_builtin_refit_profile_is_what_the_committed_runs_give_and_says_so(benches):
    builtin = load_profile("h200-graphs")
    close(refit.refit_profile(benches, "h200", date="2026-12-03").to_dict(), builtin.to_dict(), "h200-graphs")
    assert builtin.source == "measured" and {"bf46dd9", "27381d1"} <= set(builtin.citation.replace(",", " ")
                                                                             .replace(")", " ").split())
    assert {"reports/h200/engine/bf46dd9/bench.json", "reports/h200/engine/b64/bench.json"} <= set(builtin.source_files)
    cells = pd.DataFrame(builtin.fit["resident_cells"])
    assert len(cells) == 8 and set(cells["batch"]) == {1, 16, 64}  # every resident cell of both runs
    # the terms it replaced: the old engine's 1.56 ms of host per layer and 97 µs per expert kernel
    old = load_profile("h200")
    assert builtin.host_overhead_per_layer_s < old.host_overhead_per_layer_s / 10
    assert builtin.gpu_grouped.expert_fixed_s < old.gpu_expert.fixed_s / 10


def test_resident_steps_are_priced_within_the_fidelity_tolerance_and_the_committed_table_says_so(benches):
    """Measured (bench.json) against simulated (each resident cell's routing replayed on h200-graphs)."""
    table = pd.read_csv(ENGINE / "fidelity.csv", comment="#")
    for bench in benches:
        resident = {k: v for k, v in bench.routing.items() if "__resident__" in k}
        new = fidelity_table(bench.data, resident, load_profile("h200-graphs")).set_index(["model", "batch"])
        old = fidelity_table(bench.data, resident, load_profile("h200")).set_index(["model", "batch"])
        assert len(new) == len(resident) > 0
        assert (new["error"].abs() <= TOLERANCE).all(), new[["measured_ms", "simulated_ms", "error"]]
        assert (old["error"] > 1.0).all()  # the per-GEMM profile: several times the measured step
        rows = table[(table["bench"] == bench.path) & (table["policy"] == "resident")].set_index(["model", "batch"])
        assert rows.loc[new.index, "simulated_ms_h200-graphs"].to_numpy() == pytest.approx(
            new["simulated_ms"].to_numpy(), rel=1e-3)
        assert rows.loc[new.index, "measured_ms"].to_numpy() == pytest.approx(new["measured_ms"].to_numpy(), rel=1e-3)


def test_bench_without_routing_or_resident_cells_gets_a_clear_error(tmp_path, capsys, benches):
    (tmp_path / "bench.json").write_text((ENGINE / "bf46dd9" / "bench.json").read_text())
    assert refit.main(["--bench", str(tmp_path / "bench.json")]) == 2
    assert "no routing.npz beside it" in capsys.readouterr().err
    no_resident = dataclasses.replace(benches[0], data={**benches[0].data, "cells": [
        c for c in benches[0].data["cells"] if c["policy"] != "resident"]})
    with pytest.raises(refit.RefitError, match="no resident cell"):
        refit.refit_profile([no_resident])


def test_distinct_experts_per_layer_ignores_missing_entries():
    route = np.array([[[[0, 1], [1, 2]], [[3, 3], [-1, 3]]]])  # [steps 1, L 2, B 2, K 2]
    assert refit.distinct_experts(route).tolist() == [3.0, 1.0]


def test_the_fast_engine_profile_is_the_refit_with_the_engines_own_host_terms():
    """reports/h200/h200-fast-engine.json (what the H200 call scripts decide with) is the refit to the first runs of
    the fast engine (e11d7a2, 27381d1) with the CPU expert model, host time per transfer and planning overheads
    measured inside the engine (h200-engine). It is kept as it was, so the calls that decided with it stay
    reproducible; `h200-graphs` (the simulator's) was refitted since to runs where the host waits for the routing."""
    committed = load_profile(str(ENGINE.parent / "h200-fast-engine.json"))
    engine = load_profile(str(ENGINE.parent / "h200-engine.json"))
    first = [refit.read_bench_run(p) for p in (ENGINE / "bench.json", ENGINE / "b64" / "bench.json")]
    rebuilt = refit.with_engine_terms(refit.refit_profile(first, "h200", "h200-fast-engine", "2026-12-02"), engine)
    close(committed.to_dict(), rebuilt.to_dict(), "h200-fast-engine")
    for name in refit.ENGINE_TERMS:
        assert getattr(committed, name) == getattr(engine, name), name
    graphs = load_profile("h200-graphs")
    assert graphs.host_overhead_per_layer_s > 2 * committed.host_overhead_per_layer_s  # the honest host round trip
    assert "measured inside the engine" in committed.notes[-1]
