"""The fidelity table: each committed bench cell replayed on the simulator over the link the engine used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prescope.experiments.fidelity import fidelity_table
from prescope.hardware.profiles import load_profile

COMPARISON = Path(__file__).resolve().parents[2] / "reports" / "h200" / "comparison"


def test_cells_are_simulated_on_the_link_they_were_measured_on():
    bench = json.loads((COMPARISON / "mixtral4-3d15d9b.json").read_text())
    with np.load(COMPARISON / "mixtral4-3d15d9b.routing.npz") as npz:
        routing = {k: npz[k] for k in npz.files}
    table = fidelity_table(bench, routing, load_profile("h200")).set_index(["policy", "batch"])
    measured = {(c["policy"], c["batch"]): c["async_io"] for c in bench["cells"] if c["policy"] in ("prescope", "oracle",
                                                                                                   "on_demand_lru")}
    assert measured[("prescope", 4)] and not measured[("on_demand_lru", 4)]  # the case mixes both links
    for cell, async_io in measured.items():
        assert table.loc[cell, "async_io"] == async_io
    assert (table["simulated_ms"] >= table["lower_bound_ms"] - 1e-9).all()


def test_routing_of_the_wrong_shape_is_refused_naming_the_cell():
    bench = json.loads((COMPARISON / "mixtral4-3d15d9b.json").read_text())
    with np.load(COMPARISON / "mixtral4-3d15d9b.routing.npz") as npz:
        routing = {k: npz[k][:, :, 0] for k in npz.files}  # [steps, L, K]: the batch axis lost
    with pytest.raises(ValueError, match=r"routing mixtral-8x7b__.*: shape \(\d+, 4, \d+\), expected \[steps, L=4"):
        fidelity_table(bench, routing, load_profile("h200"))
