"""`prescope trace-compare`: every policy replaying a (synthetic, llama.cpp-format) trace on a twin's layout."""

from __future__ import annotations

import json

import pytest
from conftest import write_structured_route_csv

from prescope import cli, files
from prescope.policies import POLICIES


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return write_structured_route_csv(tmp_path_factory.mktemp("tc") / "q.route.csv", layers=5, experts=128, top_k=6,
                           prefill=5, decode=40, arch="qwen3moe")


@pytest.mark.usefixtures("one_thread")
def test_trace_compare_simulates_every_policy_on_the_twins_layout(csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["trace-compare", "--trace", str(csv), "--twin", "qwen3-30b-a3b", "--layers", "4",
                     "--profiles", "v100-pcie3", "--budgets", "0.25", "--batch-sizes", "1", "2", "--max-steps", "6",
                     "--out", str(out)]) == 0
    summary = files.read_json(out / "trace_compare.json")
    assert summary["source"] == "simulated" and summary["trace_top_k"] == 6
    table = files.read_csv(out / "trace_compare.csv")
    assert set(table["policy"]) == set(POLICIES) and set(table["batch"]) == {1, 2}
    assert (table["ms_per_token"] > 0).all()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 2 * len(POLICIES)
    assert cli.main(["trace-compare", "--trace", str(csv), "--twin", "mixtral-8x7b", "--out", str(out)]) == 2
    assert cli.main(["trace-compare", "--trace", str(csv), "--twin", "qwen3-30b-a3b", "--layers", "4", "--policies",
                     "prescope+cpu2", "--out", str(tmp_path / "cpu2")]) == 2  # the engine's threads: not simulated
    assert "+cpuN sets the engine's CPU-expert threads" in capsys.readouterr().err
    held = tmp_path / "held"
    assert cli.main(["trace-compare", "--trace", str(csv), "--twin", "qwen3-30b-a3b", "--layers", "4", "--policies",
                     "on_demand_lru", "--profiles", "h200", "--budgets", "0.5", "--batch-sizes", "1",
                     "--heldout-fraction", "0.3", "--out", str(held)]) == 0
    assert files.read_csv(held / "trace_compare.csv")["steps"].iloc[0] == round(0.3 * 45)
