"""`prescope simulate` for a new user's trace: any trace format, a twin's layout, a checked predictor, and a
one-line warning when the layout prices the experts only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import small_olmoe, write_route_csv

from prescope import cli
from prescope.predict import llapor
from prescope.routing.recording import record_trace
from prescope.routing.trace import save_trace

FAST = llapor.LLaPorConfig(distance=2, pca_dim=4, width=16, max_epochs=2, patience=1, batch_size=64,
                           min_group_layers=1)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(trace with hidden states of a 3-layer, 8-expert, top-2 model, its LLaPor checkpoint), in a tmp dir."""
    folder = tmp_path_factory.mktemp("simulate")
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 64, 8)) for _ in range(12)]
    trace = record_trace(small_olmoe(layers=3), None, prompts, max_new_tokens=4, batch_size=12, keep_hidden=True,
                         keep_logits=True, progress=False)
    path = save_trace(trace, folder / "t.trace.parquet")
    checkpoint = folder / "llapor.pt"
    llapor.train_llapor(trace, FAST, progress=False).save(checkpoint)
    return path, checkpoint


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    code = cli.main(["simulate", *argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    errors = "\n".join(line for line in err.strip().splitlines() if ": warning: " not in line)
    return code, json.loads(lines[-1]) if code == 0 else None, errors


def test_a_checked_predictor_drives_prescope(recorded, capsys):
    trace, checkpoint = recorded
    runs = {}
    for predictor in ("", str(checkpoint)):
        code, runs[predictor], _ = _run(capsys, "--trace", str(trace), "--policy", "lookahead_prefetch",
                                        "--predictor", predictor, "--budget-share", "0.5")
        assert code == 0 and runs[predictor]["config"]["predictor"] == predictor
    assert runs[str(checkpoint)]["totals"]["loads_prefetched"] > 0  # LLaPor's forecast was prefetched
    assert runs[str(checkpoint)]["totals"] != runs[""]["totals"]  # ...not the previous step's routing
    code, _, _ = _run(capsys, "--trace", str(trace), "--policy", "prescope", "--predictor", str(checkpoint))
    assert code == 0
    code, _, err = _run(capsys, "--trace", str(trace), "--policy", "on_demand_lru", "--predictor", str(checkpoint))
    assert code == 2 and "takes no predictor" in err and len(err.splitlines()) == 1


def test_a_predictor_of_another_model_or_without_hidden_states_is_refused(recorded, tmp_path, capsys):
    _, checkpoint = recorded  # L=3, E=8, K=2, reads hidden states
    other = write_route_csv(tmp_path / "other.route.csv", [300, 300, 300, 300], experts=16, top_k=4)
    code, _, err = _run(capsys, "--trace", str(other), "--policy", "prescope", "--predictor", str(checkpoint))
    assert code == 2 and "L=3, E=8, K=2" in err and "L=4, E=16, K=4" in err and len(err.splitlines()) == 1
    same_shape = write_route_csv(tmp_path / "same.route.csv", [300, 300, 300], experts=8, top_k=2)
    code, _, err = _run(capsys, "--trace", str(same_shape), "--policy", "prescope", "--predictor", str(checkpoint))
    assert code == 2 and "reads hidden states and the trace" in err
    code, _, err = _run(capsys, "--trace", str(same_shape), "--policy", "prescope", "--predictor",
                        str(tmp_path / "none.pt"))
    assert code == 2 and "does not exist" in err


def test_experts_only_pricing_is_said_in_one_line_and_a_twin_lifts_it(tmp_path, capsys):
    csv = write_route_csv(tmp_path / "t.route.csv", [3 * 2048 * 1024 * 2] * 16, experts=64, top_k=8)
    code = cli.main(["simulate", "--trace", str(csv), "--policy", "on_demand_lru"])
    out, err = capsys.readouterr()
    record = json.loads(out.strip().splitlines()[-1])
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(warnings) == 1 and "priced on the experts only" in warnings[0] and "--twin" in warnings[0]
    assert record["config"]["priced_on"] == "experts only"
    code, twin, err = _run(capsys, "--trace", str(csv), "--policy", "on_demand_lru", "--twin", "olmoe-1b-7b")
    assert code == 0 and "warning" not in err and twin["config"]["priced_on"] == "experts and resident work"
    assert twin["config"]["dense_params"] > 0 and twin["config"]["model_class"] == "OlmoeForCausalLM"


def test_each_layer_is_priced_by_its_own_expert_size(tmp_path, capsys):
    """Same routing, one layer's experts 4x larger: the link carries exactly that layer's extra bytes."""
    small, large = 3_000_000, 12_000_000
    base = write_route_csv(tmp_path / "same.route.csv", [small] * 4, tokens=10, seed=3)
    mixed = write_route_csv(tmp_path / "mixed.route.csv", [small, large, small, small], tokens=10, seed=3)
    records = {}
    for name, path in (("same", base), ("mixed", mixed)):
        code, records[name], _ = _run(capsys, "--trace", str(path), "--policy", "on_demand_lru",
                                      "--budget-share", "0.25", "--timeline", str(tmp_path / f"{name}.csv"))
        assert code == 0
    import pandas as pd

    same, mixed_tl = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("same", "mixed"))
    loads = mixed_tl[mixed_tl["lane"] == "pcie"]
    assert (loads["bytes"] == np.where(loads["layer"] == 1, large, small)).all()
    assert len(loads) == (same["lane"] == "pcie").sum()  # the same misses: only their sizes differ
    extra = (loads["layer"] == 1).sum() * (large - small)
    assert records["mixed"]["totals"]["bytes_moved"] - records["same"]["totals"]["bytes_moved"] == extra
    assert records["mixed"]["config"]["expert_bytes_per_layer"] == [small, large, small, small]
    layer1 = loads[loads["layer"] == 1]
    assert ((layer1["end"] - layer1["start"]).min() > 3 * (loads[loads["layer"] == 0]["end"]
                                                          - loads[loads["layer"] == 0]["start"]).max())
