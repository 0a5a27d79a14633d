"""The tables and README of a simulate-compare run."""

from __future__ import annotations

import pandas as pd

from prescope.experiments import simreadme
from prescope.experiments.benchrows import RESIDENT


def table() -> pd.DataFrame:
    rows = []
    for policy, tok_s in ((RESIDENT, 100.0), ("on_demand_lru", 10.0), ("prescope", 25.0), ("belady", 20.0)):
        rows.append({"profile": "h200", "budget": 0.25, "batch": 1, "policy": policy, "decode_ms": 1e3 / tok_s,
                     "tok_s": tok_s, "vs_on_demand_lru": tok_s / 10.0, "vs_ceiling": float("nan"),
                     "vs_resident": tok_s / 100.0, "regime": "link-bound"})
    return pd.DataFrame(rows)


def test_the_fastest_offloaded_policy_per_cell_leaves_the_resident_reference_out():
    best = simreadme.best_policies(table())
    assert best["policy"].tolist() == ["prescope"] and best["vs_on_demand_lru"].tolist() == [2.5]
    assert simreadme.main_ratios(table())["tok_s"].tolist() == [25.0]


def test_markdown_tables_round_numbers_and_leave_missing_values_blank():
    text = simreadme._md(table()[["policy", "tok_s", "vs_ceiling"]].head(2))
    assert text.splitlines()[:3] == ["| policy | tok_s | vs_ceiling |", "|---|---|---|", "| resident | 100 |  |"]
