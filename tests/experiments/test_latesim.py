"""The late_prefetch comparison replays the shipped Qwen3 trace on its twin's layout, every cell simulated."""

from __future__ import annotations

import json

import pytest

from prescope.data import shipped
from prescope.experiments.latesim import _split_policies, late_rows, main, table
from prescope.models.twins import twin_layout
from prescope.routing.reader import read_trace


def test_rows_per_batch_and_policy_with_the_twins_expert_sizes():
    trace = read_trace(shipped("routing", "qwen3-30b-a3b.route.csv.xz"), max_decode_steps=8)
    layout, dense = twin_layout("qwen3-30b-a3b")
    specs = ("on_demand_lru", "ceiling[gate=False,late_prefetch=True]")
    rows = late_rows(trace, "h200", layout=layout, dense_params=dense, policies=specs, batches=(1, 2), steps=2)
    assert [(r["policy"], r["batch"]) for r in rows] == [(p, b) for b in (1, 2) for p in specs]
    assert all(r["simulated_ms_per_step"] > 0 and r["steps"] == 2 for r in rows)
    assert {r["expert_bytes"] for r in rows} == {layout.expert_bytes} and rows[0]["profile"] == "h200"
    text = table(rows)
    assert text.startswith("simulated ms per decode step") and "(1.00x)" in text


def test_policy_lists_split_outside_brackets_and_bad_input_is_one_line(capsys):
    assert _split_policies("a;ceiling[gate=False,late_prefetch=True],b") == [
        "a", "ceiling[gate=False,late_prefetch=True]", "b"]
    assert main(["--batches", "1", "--steps", "1", "--policies", "prescope[late=1]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [["--batches", "1", "--steps", "1", "--policies", "on_demand_lru", "--profile", "h200"]])
def test_main_prints_a_table_and_json_lines_that_say_simulated(argv, capsys):
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["simulated"] is True and record["git_revision"] and record["profile"] == "h200"
