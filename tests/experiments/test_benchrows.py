"""The rows of a bench run: the median round, ratios and regimes."""

from __future__ import annotations

import pytest

from prescope.experiments import benchrows
from prescope.experiments.stock import STOCK


def test_median_round_keeps_the_median_rounds_row_and_the_spread():
    rounds = [({"a": i}, {"decode_ms_median": ms, "loads_per_step": i}, f"route{i}", None)
              for i, ms in enumerate((30.0, 10.0, 20.0))]
    about, row, route, _ = benchrows.median_round(rounds)
    assert about == {"a": 2} and route == "route2" and row["loads_per_step"] == 2
    assert row["decode_ms_rounds"] == [30.0, 10.0, 20.0] and row["decode_ms_spread"] == pytest.approx(1.0)


def test_ratios_are_within_a_model_budget_and_batch_and_the_regime_weighs_the_link_against_the_resident_step():
    def row(policy, tok_s, budget=0.25, batch=1, ms=10.0, step_bytes=0):
        return {"model": "m", "policy": policy, "budget": budget, "batch": batch, "decode_tok_s": tok_s,
                "decode_ms_median": ms, "bytes_per_step": step_bytes}

    rows = [row(STOCK, 200.0, 1.0), row(benchrows.RESIDENT, 100.0, 1.0, ms=10.0),
            row("on_demand_lru", 20.0, step_bytes=2e9), row("prescope", 50.0, step_bytes=1e8),
            row("on_demand_lru", 5.0, 0.5), row("prescope", 25.0, 0.5, batch=4)]
    benchrows.add_ratios(rows, link_gbps=50.0)
    lru, prescope, other_budget, other_batch = rows[2:]
    assert prescope["vs_on_demand_lru"] == pytest.approx(2.5) and lru["vs_on_demand_lru"] == 1.0
    assert prescope["vs_stock"] == pytest.approx(0.25) and prescope["vs_resident"] == pytest.approx(0.5)
    assert "vs_on_demand_lru" not in other_batch and other_budget["vs_on_demand_lru"] == 1.0
    # 2 GB at 50 GB/s is 40 ms, past the 10 ms resident step; 0.1 GB is 2 ms, within it
    assert lru["regime"] == "link-bound" and prescope["regime"] == "host-bound"
    # the references get no ratio to the offloaded policies; the resident run is half the stock one
    assert "vs_on_demand_lru" not in rows[1] and rows[1]["vs_stock"] == pytest.approx(0.5)
